//! Which tensors GPS selects, trains fully or freezes: a [`Policy`] is an ordered list of
//! [`Rule`]s on tensor *names* (and optionally dimensionality); the first matching rule wins.
//!
//! Policies are data, not code: they serialise to JSON, so a user can pass an edited policy
//! for a model this crate has no preset for. The presets follow the reference GPS code
//! (Zhang et al., CVPR 2024, `FightingFighting/GPS`): weight matrices and conv kernels are
//! selected top-K per output row; biases, heads and layer scales train fully; norms and
//! position embeddings stay frozen. See `shared/notes/gps-method.md`.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// What happens to one tensor during GPS fine-tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Treatment {
    /// Top-K entries of every output row are selected; the rest stay frozen.
    /// On a 1-D tensor every "row" has one entry, so the whole tensor trains (see
    /// [`Policy::treatment`]).
    Selected,
    /// Every entry trains.
    Trainable,
    /// Never changes.
    Frozen,
}

/// One rule: a glob pattern on the full tensor name (`*` = any run of characters, dots
/// included; `?` = one character), optional bounds on the number of dimensions, and the
/// treatment of matching tensors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// Glob on the full name, e.g. `image_encoder.blocks.*.attn.qkv.weight`, `*.bias`, `head.*`.
    pub pattern: String,
    /// Only tensors with at least this many dimensions match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ndim: Option<usize>,
    /// Only tensors with at most this many dimensions match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ndim: Option<usize>,
    /// What matching tensors get.
    pub treat: Treatment,
}

impl Rule {
    /// A rule on a name pattern only.
    pub fn new(pattern: &str, treat: Treatment) -> Self {
        Rule {
            pattern: pattern.to_string(),
            min_ndim: None,
            max_ndim: None,
            treat,
        }
    }

    /// Restrict to tensors with at least `n` dimensions.
    pub fn min_ndim(mut self, n: usize) -> Self {
        self.min_ndim = Some(n);
        self
    }

    /// Restrict to tensors with at most `n` dimensions.
    pub fn max_ndim(mut self, n: usize) -> Self {
        self.max_ndim = Some(n);
        self
    }

    /// Whether this rule applies to `name` of `ndim` dimensions.
    pub fn matches(&self, name: &str, ndim: usize) -> bool {
        self.min_ndim.is_none_or(|m| ndim >= m)
            && self.max_ndim.is_none_or(|m| ndim <= m)
            && glob_match(self.pattern.as_bytes(), name.as_bytes())
    }
}

/// Glob match with `*` (any run, dots included) and `?` (one byte). Iterative with
/// single-star backtracking: linear-ish, no recursion blow-up on long names.
pub fn glob_match(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    while p < pat.len() && pat[p] == b'*' {
        p += 1;
    }
    p == pat.len()
}

/// Ordered rules; the first match wins, `default` applies when none matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// Preset name or a user label (informational).
    pub name: String,
    /// Rules, tried in order.
    pub rules: Vec<Rule>,
    /// Treatment of tensors no rule matches.
    #[serde(default = "default_frozen")]
    pub default: Treatment,
}

fn default_frozen() -> Treatment {
    Treatment::Frozen
}

impl Policy {
    /// Names accepted by [`Policy::preset`].
    pub const PRESETS: [&'static str; 4] = ["sam", "classifier", "decoder", "full"];

    /// The treatment of tensor `name` with shape `shape`. A `Selected` rule that matches a
    /// tensor with fewer than 2 dimensions yields `Trainable`: each entry is its own row, and
    /// top-K (K ≥ 1) of a one-entry row is the whole row.
    pub fn treatment(&self, name: &str, shape: &[usize]) -> Treatment {
        let t = self
            .rules
            .iter()
            .find(|r| r.matches(name, shape.len()))
            .map(|r| r.treat)
            .unwrap_or(self.default);
        if t == Treatment::Selected && shape.len() < 2 {
            Treatment::Trainable
        } else {
            t
        }
    }

    /// A preset by name (`sam`, `classifier`, `decoder`, `full`) or a JSON policy file path.
    pub fn from_name_or_file(s: &str) -> Result<Self> {
        if let Some(p) = Self::preset(s) {
            return Ok(p);
        }
        let path = std::path::Path::new(s);
        if path.exists() {
            let p: Policy = crate::util::fs::read_json(path)?;
            p.validate()?;
            return Ok(p);
        }
        Err(Error::Config {
            field: "policy".into(),
            msg: format!(
                "`{s}` is neither a preset ({}) nor an existing JSON policy file",
                Self::PRESETS.join(", ")
            ),
        })
    }

    /// A preset by name.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "sam" => Some(Self::sam()),
            "classifier" => Some(Self::classifier()),
            "decoder" => Some(Self::decoder()),
            "full" => Some(Self::full()),
            _ => None,
        }
    }

    /// Reject empty patterns (they match nothing but the empty name, surely a mistake).
    pub fn validate(&self) -> Result<()> {
        for (i, r) in self.rules.iter().enumerate() {
            if r.pattern.is_empty() {
                return Err(Error::Config {
                    field: format!("rules[{i}].pattern"),
                    msg: "empty pattern".into(),
                });
            }
            if let (Some(lo), Some(hi)) = (r.min_ndim, r.max_ndim) {
                if lo > hi {
                    return Err(Error::Config {
                        field: format!("rules[{i}]"),
                        msg: format!("min_ndim {lo} > max_ndim {hi}"),
                    });
                }
            }
        }
        Ok(())
    }

    /// SAM (Meta's names): inside `image_encoder.` the weight matrices (patch embedding, qkv,
    /// attention projection, MLP, neck convs) are selected, biases train (the neck LayerNorm2d
    /// biases too), norms / pos_embed / rel_pos stay frozen; the prompt encoder and mask decoder train fully, except the
    /// positional-encoding buffer.
    /// [`Policy::sam`] without the selected entries: what GPS trains fully (mask decoder,
    /// prompt encoder, encoder biases), the rest frozen (`decoder+bias`).
    pub fn sam_decoder_bias() -> Self {
        let mut p = Policy::sam();
        for r in p.rules.iter_mut() {
            if r.treat == Treatment::Selected {
                r.treat = Treatment::Frozen;
            }
        }
        p.name = "sam-decoder-bias".into();
        p
    }

    /// [`Policy::sam`] with the prompt encoder and mask decoder frozen: only the selected
    /// encoder entries and the encoder biases train (`gps-encoder`).
    pub fn sam_encoder_only() -> Self {
        let mut p = Policy::sam();
        for r in p.rules.iter_mut() {
            if r.pattern.starts_with("prompt_encoder.") || r.pattern.starts_with("mask_decoder.") {
                r.treat = Treatment::Frozen;
            }
        }
        p.name = "sam-encoder-only".into();
        p
    }

    pub fn sam() -> Self {
        use Treatment::*;
        let enc = "image_encoder.";
        let mut rules = vec![
            Rule::new(
                "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                Frozen,
            ),
            Rule::new("prompt_encoder.*", Trainable),
            Rule::new("mask_decoder.*", Trainable),
        ];
        for p in [
            "patch_embed.proj.weight",
            "blocks.*.attn.qkv.weight",
            "blocks.*.attn.proj.weight",
            "blocks.*.mlp.lin1.weight",
            "blocks.*.mlp.lin2.weight",
            "neck.0.weight",
            "neck.2.weight",
        ] {
            rules.push(Rule::new(&format!("{enc}{p}"), Selected));
        }
        // The neck's LayerNorm2d biases train, as in the reference (its `bias` rule comes
        // before its 1-D neck rule, and their names hold no "norm"); their weights stay frozen.
        for p in ["neck.1.bias", "neck.3.bias"] {
            rules.push(Rule::new(&format!("{enc}{p}"), Trainable));
        }
        for p in ["*norm*", "neck.1.*", "neck.3.*", "pos_embed", "*rel_pos*"] {
            rules.push(Rule::new(&format!("{enc}{p}"), Frozen));
        }
        rules.push(Rule::new(&format!("{enc}*.bias"), Trainable));
        Policy {
            name: "sam".into(),
            rules,
            default: Frozen,
        }
    }

    /// timm-style ViT / ConvNeXt classifiers: weight matrices and conv kernels (≥ 2-D) selected;
    /// biases, the head and layer scales (`gamma`, `ls1`/`ls2`) trainable; norms (incl.
    /// ConvNeXt's `stem.1` and `downsample.0` LayerNorms), pos_embed and cls_token frozen.
    pub fn classifier() -> Self {
        use Treatment::*;
        let rules = vec![
            Rule::new("head.*", Trainable),
            Rule::new("*pos_embed*", Frozen),
            Rule::new("*cls_token*", Frozen),
            Rule::new("*dist_token*", Frozen),
            Rule::new("*reg_token*", Frozen),
            Rule::new("*gamma*", Trainable),
            Rule::new("*.ls1.*", Trainable),
            Rule::new("*.ls2.*", Trainable),
            Rule::new("*norm*", Frozen),
            Rule::new("stem.1.*", Frozen),
            Rule::new("*.downsample.0.*", Frozen),
            // Any other 1-D `.weight` in a timm model is a norm's scale.
            Rule::new("*.weight", Frozen).max_ndim(1),
            Rule::new("*", Selected).min_ndim(2),
            Rule::new("*.bias", Trainable),
        ];
        Policy {
            name: "classifier".into(),
            rules,
            default: Frozen,
        }
    }

    /// Baseline: only SAM's mask decoder trains.
    pub fn decoder() -> Self {
        Policy {
            name: "decoder".into(),
            rules: vec![Rule::new("mask_decoder.*", Treatment::Trainable)],
            default: Treatment::Frozen,
        }
    }

    /// Baseline: full fine-tuning of everything except buffers.
    pub fn full() -> Self {
        use Treatment::*;
        Policy {
            name: "full".into(),
            rules: vec![
                Rule::new("*positional_encoding_gaussian_matrix", Frozen),
                Rule::new("*running_mean", Frozen),
                Rule::new("*running_var", Frozen),
                Rule::new("*num_batches_tracked", Frozen),
                Rule::new("*", Trainable),
            ],
            default: Frozen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Treatment::*;

    #[test]
    fn glob_matches_like_a_shell() {
        let m = |p: &str, s: &str| glob_match(p.as_bytes(), s.as_bytes());
        assert!(m("*", ""));
        assert!(m("*.bias", "blocks.0.attn.qkv.bias"));
        assert!(!m("*.bias", "blocks.0.attn.qkv.weight"));
        assert!(m("blocks.*.attn.qkv.weight", "blocks.11.attn.qkv.weight"));
        assert!(!m("blocks.*.attn.qkv.weight", "blocks.11.attn.proj.weight"));
        assert!(m("a?c", "abc"));
        assert!(!m("a?c", "ac"));
        assert!(m("*norm*", "image_encoder.blocks.3.norm1.weight"));
        assert!(m("head.*", "head.fc.weight"));
        assert!(!m("head.*", "blocks.head.x"));
    }

    #[test]
    fn sam_preset_classifies_reference_names() {
        let p = Policy::sam();
        let e = "image_encoder.";
        let t = |n: &str, s: &[usize]| p.treatment(n, s);
        assert_eq!(
            t(&format!("{e}patch_embed.proj.weight"), &[8, 3, 16, 16]),
            Selected
        );
        assert_eq!(t(&format!("{e}patch_embed.proj.bias"), &[8]), Trainable);
        assert_eq!(
            t(&format!("{e}blocks.4.attn.qkv.weight"), &[24, 8]),
            Selected
        );
        assert_eq!(t(&format!("{e}blocks.4.attn.qkv.bias"), &[24]), Trainable);
        assert_eq!(
            t(&format!("{e}blocks.4.mlp.lin2.weight"), &[8, 32]),
            Selected
        );
        assert_eq!(t(&format!("{e}blocks.4.norm1.weight"), &[8]), Frozen);
        assert_eq!(t(&format!("{e}blocks.4.norm2.bias"), &[8]), Frozen);
        assert_eq!(t(&format!("{e}blocks.4.attn.rel_pos_h"), &[27, 4]), Frozen);
        assert_eq!(t(&format!("{e}pos_embed"), &[1, 4, 4, 8]), Frozen);
        assert_eq!(t(&format!("{e}neck.0.weight"), &[4, 8, 1, 1]), Selected);
        assert_eq!(t(&format!("{e}neck.1.weight"), &[4]), Frozen);
        assert_eq!(t(&format!("{e}neck.3.bias"), &[4]), Trainable);
        assert_eq!(t(&format!("{e}neck.1.bias"), &[4]), Trainable);
        assert_eq!(t(&format!("{e}neck.3.weight"), &[4]), Frozen);
        assert_eq!(t("mask_decoder.iou_token.weight", &[1, 4]), Trainable);
        assert_eq!(t("prompt_encoder.no_mask_embed.weight", &[1, 4]), Trainable);
        assert_eq!(
            t(
                "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
                &[2, 4]
            ),
            Frozen
        );
    }

    #[test]
    fn classifier_preset_covers_vit_and_convnext() {
        let p = Policy::classifier();
        let t = |n: &str, s: &[usize]| p.treatment(n, s);
        assert_eq!(t("patch_embed.proj.weight", &[8, 3, 16, 16]), Selected);
        assert_eq!(t("blocks.0.attn.qkv.weight", &[24, 8]), Selected);
        assert_eq!(t("blocks.0.attn.qkv.bias", &[24]), Trainable);
        assert_eq!(t("blocks.0.norm1.weight", &[8]), Frozen);
        assert_eq!(t("blocks.0.ls1.gamma", &[8]), Trainable);
        assert_eq!(t("cls_token", &[1, 1, 8]), Frozen);
        assert_eq!(t("pos_embed", &[1, 5, 8]), Frozen);
        assert_eq!(t("head.weight", &[10, 8]), Trainable);
        assert_eq!(t("head.norm.weight", &[8]), Trainable);
        assert_eq!(t("norm.bias", &[8]), Frozen);
        assert_eq!(t("stem.0.weight", &[8, 3, 4, 4]), Selected);
        assert_eq!(t("stem.1.weight", &[8]), Frozen);
        assert_eq!(t("stem.1.bias", &[8]), Frozen);
        assert_eq!(t("stages.1.downsample.0.bias", &[8]), Frozen);
        assert_eq!(t("stages.1.downsample.1.weight", &[16, 8, 2, 2]), Selected);
        assert_eq!(
            t("stages.0.blocks.0.conv_dw.weight", &[8, 1, 7, 7]),
            Selected
        );
        assert_eq!(t("stages.0.blocks.0.gamma", &[8]), Trainable);
        assert_eq!(t("stages.0.blocks.0.mlp.fc1.bias", &[32]), Trainable);
    }

    #[test]
    fn selected_rule_on_a_vector_means_trainable_and_json_round_trips() {
        let p = Policy {
            name: "mine".into(),
            rules: vec![Rule::new("*", Selected)],
            default: Frozen,
        };
        assert_eq!(p.treatment("x", &[5]), Trainable);
        assert_eq!(p.treatment("x", &[5, 2]), Selected);
        for name in Policy::PRESETS {
            let p = Policy::preset(name).unwrap();
            p.validate().unwrap();
            let back: Policy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
            assert_eq!(back, p);
        }
        let p: Policy =
            serde_json::from_str(r#"{"name":"x","rules":[{"pattern":"a.*","treat":"trainable"}]}"#)
                .unwrap();
        assert_eq!(p.treatment("a.w", &[2, 2]), Trainable);
        assert_eq!(p.treatment("b.w", &[2, 2]), Frozen);
        let e = Policy::from_name_or_file("/nonexistent/p.json").unwrap_err();
        assert!(e.to_string().contains("policy"), "{e}");
    }
}
