//! What a batch inference job writes about itself (`report.json`): the [`InferReport`], its
//! per-image scores with their positions, and the [`Shard`] it ran — read back by
//! `report merge` ([`super::report`]) and written by the job ([`super::job`]).

use super::identity::JobIdentity;
use super::input::BadInput;
use crate::data::resize::Resize;
use crate::error::{Error, Result};
use crate::metrics::{FieldScore, ImageScore, PooledCounts, SegReport, SetRow};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Most shards one job may be split into.
pub const MAX_SHARDS: usize = 100_000;

/// One of `count` disjoint parts of a job's inputs: input `i` (in the job's order) belongs to
/// shard `i % count`. Every input is in exactly one shard, whatever the count, and a shard's
/// images keep their order, so merged shard reports equal an unsharded run's exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// 0-based.
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// `I/N` with 0 ≤ I < N (as `--shard` takes it).
    pub fn parse(s: &str) -> Result<Shard> {
        let bad = |m: &str| Error::Config {
            field: "shard".into(),
            msg: format!("`{s}`: {m} (expected I/N with 0 ≤ I < N, e.g. 0/3)"),
        };
        let (i, n) = s.split_once('/').ok_or_else(|| bad("no `/`"))?;
        let index: usize = i.trim().parse().map_err(|_| bad("I is not a number"))?;
        let count: usize = n.trim().parse().map_err(|_| bad("N is not a number"))?;
        Shard::new(index, count).map_err(|_| bad("out of range"))
    }

    pub fn new(index: usize, count: usize) -> Result<Shard> {
        if count == 0 || index >= count || count > MAX_SHARDS {
            return Err(Error::Config {
                field: "shard".into(),
                msg: format!("{index}/{count}: need 0 ≤ I < N ≤ {MAX_SHARDS}"),
            });
        }
        Ok(Shard { index, count })
    }

    /// The shard of a Slurm array task (`SLURM_ARRAY_TASK_ID` − `SLURM_ARRAY_TASK_MIN` of
    /// `SLURM_ARRAY_TASK_COUNT`), when those variables are set.
    pub fn from_slurm_env() -> Result<Option<Shard>> {
        let get = |k: &str| std::env::var(k).ok();
        let (Some(id), Some(count)) = (get("SLURM_ARRAY_TASK_ID"), get("SLURM_ARRAY_TASK_COUNT"))
        else {
            return Ok(None);
        };
        let num = |k: &str, v: &str| {
            v.trim().parse::<usize>().map_err(|_| Error::Config {
                field: k.into(),
                msg: format!("`{v}` is not a whole number"),
            })
        };
        let id = num("SLURM_ARRAY_TASK_ID", &id)?;
        let count = num("SLURM_ARRAY_TASK_COUNT", &count)?;
        let min = match get("SLURM_ARRAY_TASK_MIN") {
            Some(m) => num("SLURM_ARRAY_TASK_MIN", &m)?,
            None => 0,
        };
        let index = id.checked_sub(min).ok_or_else(|| Error::Config {
            field: "SLURM_ARRAY_TASK_ID".into(),
            msg: format!("{id} is below SLURM_ARRAY_TASK_MIN {min}"),
        })?;
        Shard::new(index, count).map(Some)
    }

    /// True when input number `i` (in the job's order) belongs to this shard.
    pub fn contains(&self, i: usize) -> bool {
        i % self.count == self.index
    }
}

/// What a job did; written to `report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InferReport {
    pub engine: String,
    /// The engine's one-line description (model file, signature, threads).
    pub model: String,
    pub input_size: usize,
    pub resize: Resize,
    pub threshold: f32,
    pub batch_size: usize,
    /// Images segmented.
    pub images: usize,
    /// Inputs skipped (`--skip-bad`), with reasons.
    pub skipped: Vec<BadInput>,
    /// Wall time of the whole job (decode, resize, model, post-processing, writing).
    pub seconds: f64,
    pub images_per_s: f64,
    /// Time inside the engine only.
    pub model_seconds: f64,
    pub model_images_per_s: f64,
    /// Peak resident memory of the process (VmHWM), MB.
    pub peak_rss_mb: f64,
    /// mDice/mIoU (and the GPS reference's pooled numbers, labelled) when masks were given.
    pub metrics: Option<SegReport>,
    pub out: PathBuf,
    /// The shard this job ran (`None`: all inputs).
    #[serde(default)]
    pub shard: Option<Shard>,
    /// Usable inputs of the whole job before sharding.
    #[serde(default)]
    pub total_inputs: usize,
    /// Per-image scores at full precision, each with its position in the whole job's input
    /// order (what `report merge` needs to reproduce an unsharded run exactly).
    #[serde(default)]
    pub scores: Vec<IndexedScore>,
    /// Pooled pixel counts behind the reference numbers.
    #[serde(default)]
    pub pooled: Option<PooledCounts>,
    /// A shard's job identity ([`super::identity`]): what `report merge` checks first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobIdentity>,
    /// Positions (in the whole job's input order) of this job's inputs skipped while running
    /// (`--skip-bad`: decoding failed or the logits were non-finite); with the scores' indices
    /// they account for every input of the shard.
    #[serde(default)]
    pub skipped_positions: Vec<usize>,
    /// The field's metrics per set (`mdice miou wfm sm em_mean em_max em_adp mae`), computed
    /// from exactly the 8-bit maps saved as `probs/<id>.png`; one row per test set of a
    /// PraNet run (ids `<Set>/<id>`), else one for the whole job. Empty without
    /// `--save-probs` (or a PraNet run) and then not written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sets: Vec<SetRow>,
    /// The row name of images whose id names no set.
    #[serde(default = "default_set_name")]
    pub set_name: String,
    /// Per-image field scores with their positions (what `report merge` rebuilds `sets` from).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub field_scores: Vec<IndexedField>,
}

fn default_set_name() -> String {
    "images".into()
}

/// One image's field scores, its id and its position in the job's input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexedField {
    pub index: usize,
    pub id: String,
    #[serde(flatten)]
    pub score: FieldScore,
}

/// One image's scores and its position in the job's input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexedScore {
    pub index: usize,
    #[serde(flatten)]
    pub score: ImageScore,
}
