//! The identity of a sharded inference job, written into every shard's `report.json` so that
//! `report merge` joins only shards of one job ([`super::report::merge_reports`]).
//!
//! Everything that changes a shard's numbers is in it, by content, never by path:
//!
//! - **model**: size and SHA-256 of each file the engine's numbers come from, in load order —
//!   an ONNX model and every file loading it reads ([`crate::onnx::integrity::companion_files`]:
//!   its external data, a task file's base and the base's data), the prompted pair's two
//!   models, or the Candle engine's checkpoint — and the SHA-256 of the settings not in those
//!   files (the Candle engine's SAM config). The same model given by a relative or an absolute
//!   path is the same job; another model with the same name is not.
//! - **inputs**: the number of usable inputs of the whole job and one SHA-256 over the list in
//!   the job's order — each image's id, and each image's and mask's size and SHA-256. The
//!   order is part of it because shard membership is by position (`i mod N`): the same files
//!   listed in another order give other shards.
//! - **options**: engine, input size, resize, threshold, whether the job is scored, where the
//!   prompts come from (the SHA-256 of the parsed prompt file, or the sampling spec and seed)
//!   and the shard count N.
//!
//! Cost: every file is read once per shard (streamed, inputs in parallel); a job that is not
//! sharded computes none of it.

use super::input::Inputs;
use crate::data::resize::Resize;
use crate::error::Result;
use crate::util::hash::{hex, sha256_file, FileHash};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// One file of the model, by content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub bytes: u64,
    pub sha256: String,
}

impl From<FileHash> for FileDigest {
    fn from(h: FileHash) -> Self {
        FileDigest {
            bytes: h.bytes,
            sha256: h.hex(),
        }
    }
}

/// What makes two shard reports parts of one job (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobIdentity {
    /// The model's files by content, in load order.
    pub model: Vec<FileDigest>,
    /// SHA-256 of the model settings not in its files (empty when there are none).
    pub model_settings: String,
    pub engine: String,
    pub input_size: usize,
    /// Usable inputs of the whole job (before sharding).
    pub inputs: usize,
    /// SHA-256 of the inputs' list (ids, sizes and content hashes in the job's order).
    pub inputs_sha256: String,
    /// Every input has a ground-truth mask: the shards carry scores and pooled counts.
    pub scored: bool,
    pub resize: Resize,
    pub threshold: f32,
    /// `none`, `file sha256:<digest of the parsed prompts>` or `masks <spec> seed <seed>`.
    pub prompts: String,
    pub shard_count: usize,
    /// The shards score the field's metrics on their saved 8-bit maps (`--save-probs`, or a
    /// PraNet run's test sets); jobs written before this field had none.
    #[serde(default)]
    pub field_metrics: bool,
}

impl JobIdentity {
    /// The first field (as named in `report.json`, under `job.`) where `other` differs.
    pub fn first_difference(&self, other: &JobIdentity) -> Option<&'static str> {
        let fields: [(&'static str, bool); 12] = [
            ("model", self.model == other.model),
            (
                "model_settings",
                self.model_settings == other.model_settings,
            ),
            ("engine", self.engine == other.engine),
            ("input_size", self.input_size == other.input_size),
            ("inputs", self.inputs == other.inputs),
            ("inputs_sha256", self.inputs_sha256 == other.inputs_sha256),
            ("scored", self.scored == other.scored),
            ("resize", self.resize == other.resize),
            (
                "threshold",
                self.threshold.to_bits() == other.threshold.to_bits(),
            ),
            ("prompts", self.prompts == other.prompts),
            ("shard_count", self.shard_count == other.shard_count),
            ("field_metrics", self.field_metrics == other.field_metrics),
        ];
        fields.iter().find(|(_, same)| !same).map(|(f, _)| *f)
    }
}

/// SHA-256 over the inputs in order: per item its id, then the image's and the mask's size
/// and SHA-256 (each length-prefixed, so no two lists share an encoding).
pub fn inputs_digest(inputs: &Inputs) -> Result<String> {
    let files: Vec<(FileHash, Option<FileHash>)> = inputs
        .items
        .par_iter()
        .map(|it| {
            let image = sha256_file(&it.image)?;
            let mask = it.mask.as_deref().map(sha256_file).transpose()?;
            Ok((image, mask))
        })
        .collect::<Result<_>>()?;
    let mut h = Sha256::new();
    for (it, (image, mask)) in inputs.items.iter().zip(&files) {
        h.update((it.id.len() as u64).to_le_bytes());
        h.update(it.id.as_bytes());
        for f in std::iter::once(Some(image)).chain(std::iter::once(mask.as_ref())) {
            match f {
                Some(f) => {
                    h.update([1u8]);
                    h.update(f.bytes.to_le_bytes());
                    h.update(f.sha256);
                }
                None => h.update([0u8]),
            }
        }
    }
    Ok(hex(&h.finalize()))
}

/// The files an ONNX model's numbers come from: the model, then what loading it reads.
pub fn onnx_files(model: &std::path::Path) -> Vec<PathBuf> {
    let mut v = vec![model.to_path_buf()];
    v.extend(crate::onnx::integrity::companion_files(model));
    v
}
