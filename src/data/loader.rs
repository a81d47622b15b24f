//! Batching: a resumable, seeded batch iterator over a subset of a dataset's indices that
//! decodes, resizes and augments in parallel (rayon) and can cache decoded+resized samples in
//! memory so that epoch 2+ does not decode again.
//!
//! Reproducibility: the order of epoch `e` is a shuffle by the generator stored in
//! [`LoaderState::epoch_rng`]; the augmentation of the sample at position `p` of epoch `e` uses
//! `Rng::derive(seed, "augment/e/p")`. So [`Loader::state`] → [`Loader::restore`] continues with
//! bit-identical batches, whatever the thread count.

use super::augment::{ClsAugment, SegAugment};
use super::classification::ClsDataset;
use super::kvasir::{self, KvasirDataset, PackedSegSample, SegBatch, SegSample};
use super::prompts::{self, PromptSpec};
use super::resize::{self, Resize};
use crate::error::{Error, Result};
use crate::util::Rng;
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// What a [`Loader`] batches: how to load one item, augment it and stack a batch.
pub trait Source: Sync {
    /// A decoded, resized, not yet augmented item (what the cache holds).
    type Item: Clone + Send + Sync;
    /// An augmented item ready to stack.
    type Ready: Send;
    type Batch;
    /// Number of items in the underlying dataset.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Decode and resize item `index`.
    fn load(&self, index: usize) -> Result<Self::Item>;
    /// A streaming source (synthetic data drawn fresh every epoch, never repeated): item
    /// `index` of `epoch` is [`Source::load_at`]`(epoch, index)`, and nothing is cached.
    fn streaming(&self) -> bool {
        false
    }
    /// Item `index` of `epoch`; a dataset's items are the same every epoch.
    fn load_at(&self, epoch: u64, index: usize) -> Result<Self::Item> {
        let _ = epoch;
        self.load(index)
    }
    /// Augment (or just convert) an item; `rng` is specific to this item and epoch.
    fn prepare(&self, item: Self::Item, rng: &mut Rng, augment: bool) -> Self::Ready;
    /// Stack items into a batch on `device`.
    fn collate(&self, items: Vec<Self::Ready>, device: &Device) -> Result<Self::Batch>;
}

/// Loader settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Shuffle every epoch (training) or keep index order (evaluation).
    pub shuffle: bool,
    /// Drop a last incomplete batch.
    pub drop_last: bool,
    /// Keep decoded+resized items in memory (u8: about 4·S² bytes per Kvasir sample plus its
    /// original mask, ≈ 4 GB for 880 images at S = 1024, 0.3 GB at S = 256).
    pub cache: bool,
    /// Apply the source's augmentation.
    pub augment: bool,
    pub seed: u64,
}

impl LoaderConfig {
    /// Training defaults: shuffle, augment, keep the last batch, no cache (opt in with
    /// `cache = true` when memory allows; see [`LoaderConfig::cache`]).
    pub fn train(batch_size: usize, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: true,
            drop_last: false,
            cache: false,
            augment: true,
            seed,
        }
    }

    /// Evaluation defaults: fixed order, no augmentation, no cache.
    pub fn eval(batch_size: usize) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: false,
            drop_last: false,
            cache: false,
            augment: false,
            seed: 0,
        }
    }
}

/// Serialisable iterator position, for checkpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Position (in samples) within the epoch's order.
    pub position: usize,
    /// The generator at the start of this epoch (it shuffles this epoch's order).
    pub epoch_rng: Rng,
    /// Number of indices the loader iterates (checked on restore).
    pub len: usize,
    pub seed: u64,
}

/// A resumable batch iterator over `indices` of a [`Source`].
pub struct Loader<S: Source> {
    source: S,
    indices: Vec<usize>,
    cfg: LoaderConfig,
    cache: Option<Vec<OnceLock<S::Item>>>,
    state: LoaderState,
    order: Vec<usize>,
}

impl<S: Source> Loader<S> {
    /// A loader over `indices` (positions in the source); errors on an out-of-range index or a
    /// zero batch size.
    pub fn new(source: S, indices: Vec<usize>, cfg: LoaderConfig) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(Error::Config {
                field: "batch_size".into(),
                msg: "must be at least 1".into(),
            });
        }
        if let Some(&bad) = indices.iter().find(|&&i| i >= source.len()) {
            return Err(Error::Data {
                msg: format!("index {bad} out of range ({} samples)", source.len()),
            });
        }
        let cache = (cfg.cache && !source.streaming())
            .then(|| (0..source.len()).map(|_| OnceLock::new()).collect());
        let state = LoaderState {
            epoch: 0,
            position: 0,
            epoch_rng: Rng::derive(cfg.seed, "loader-order"),
            len: indices.len(),
            seed: cfg.seed,
        };
        let mut l = Loader {
            source,
            indices,
            cfg,
            cache,
            state,
            order: Vec::new(),
        };
        l.make_order();
        Ok(l)
    }

    /// A loader over every item of the source.
    pub fn all(source: S, cfg: LoaderConfig) -> Result<Self> {
        let n = source.len();
        Self::new(source, (0..n).collect(), cfg)
    }

    fn make_order(&mut self) {
        self.order = self.indices.clone();
        if self.cfg.shuffle {
            let mut r = self.state.epoch_rng.clone();
            r.shuffle(&mut self.order);
        }
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Items per epoch.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.indices.len(), self.cfg.batch_size);
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    pub fn epoch(&self) -> u64 {
        self.state.epoch
    }

    /// The position to save in a checkpoint.
    pub fn state(&self) -> LoaderState {
        self.state.clone()
    }

    /// Continue from a saved position (same dataset subset and seed).
    pub fn restore(&mut self, st: LoaderState) -> Result<()> {
        if st.len != self.indices.len() || st.seed != self.cfg.seed || st.position > st.len {
            return Err(Error::Data {
                msg: format!(
                    "loader state is for {} samples with seed {} (position {}), this loader has {} samples with seed {}",
                    st.len,
                    st.seed,
                    st.position,
                    self.indices.len(),
                    self.cfg.seed
                ),
            });
        }
        self.state = st;
        self.make_order();
        Ok(())
    }

    /// Move to the start of the next epoch (reshuffling).
    pub fn next_epoch(&mut self) {
        let mut r = self.state.epoch_rng.clone();
        // Advance the epoch generator by a fixed step so each epoch gets a fresh order.
        let next = Rng::new(r.next_u64());
        self.state.epoch += 1;
        self.state.position = 0;
        self.state.epoch_rng = next;
        self.make_order();
    }

    fn get_item(&self, index: usize) -> Result<S::Item> {
        get_item(&self.source, &self.cache, self.state.epoch, index)
    }

    /// The next batch of this epoch, or `None` at its end (the following call starts the
    /// next epoch). Items are decoded/augmented in parallel on the rayon pool.
    pub fn next_batch(&mut self, device: &Device) -> Result<Option<S::Batch>> {
        let Some(range) = self.plan(1).pop() else {
            self.next_epoch();
            return Ok(None);
        };
        let ready = prepare_range(self.parts(), range.clone())?;
        self.state.position = range.end;
        self.source.collate(ready, device).map(Some)
    }

    /// The position ranges of the next (up to) `steps` batches of this epoch.
    fn plan(&self, steps: usize) -> Vec<std::ops::Range<usize>> {
        let n = self.order.len();
        let mut pos = self.state.position;
        let mut out = Vec::new();
        while out.len() < steps {
            let remaining = n - pos.min(n);
            if remaining == 0 || (self.cfg.drop_last && remaining < self.cfg.batch_size) {
                break;
            }
            let end = (pos + self.cfg.batch_size).min(n);
            out.push(pos..end);
            pos = end;
        }
        out
    }

    fn parts(&self) -> Parts<'_, S> {
        Parts {
            source: &self.source,
            cache: &self.cache,
            order: &self.order,
            epoch: self.state.epoch,
            seed: self.cfg.seed,
            augment: self.cfg.augment,
        }
    }

    /// Skip the next batch of this epoch without decoding it (a data-parallel rank whose
    /// turn it is not); `false` at the epoch's end (the next epoch is not started).
    pub fn skip_batch(&mut self) -> bool {
        match self.plan(1).pop() {
            Some(range) => {
                self.state.position = range.end;
                true
            }
            None => false,
        }
    }

    /// [`Self::run_batches`] for rank `rank` of `ranks` data-parallel processes: every rank
    /// walks the same batches (same order, same positions, so the same [`LoaderState`]) and
    /// decodes only its own contiguous part of each ([`shard_range`]); `step` gets `None`
    /// when that part is empty (a last batch smaller than the world). With one rank, exactly
    /// [`Self::run_batches`].
    pub fn run_shard_batches<F>(
        &mut self,
        steps: usize,
        device: &Device,
        (rank, ranks): (usize, usize),
        mut step: F,
    ) -> Result<usize>
    where
        S: Send,
        F: FnMut(usize, Option<S::Batch>) -> Result<()>,
    {
        let ranges = self.plan(steps);
        let local = |r: &std::ops::Range<usize>| shard_range(r.clone(), rank, ranks);
        let Some(first) = ranges.first() else {
            return Ok(0);
        };
        let mut next = Some(prepare_range(self.parts(), local(first)));
        let mut done = 0;
        for (k, range) in ranges.iter().enumerate() {
            let ready = match next.take() {
                Some(r) => r?,
                None => break,
            };
            let parts = self.parts();
            let after = ranges.get(k + 1).map(local);
            let source = &self.source;
            let r = std::thread::scope(|sc| -> Result<Option<Result<Vec<S::Ready>>>> {
                let pending = after.map(|r| sc.spawn(move || prepare_range(parts, r)));
                let batch = match ready.is_empty() {
                    true => None,
                    false => Some(source.collate(ready, device)?),
                };
                step(k, batch)?;
                Ok(pending.map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Data {
                            msg: "the data loading thread panicked".into(),
                        })
                    })
                }))
            });
            next = r?;
            self.state.position = range.end;
            done += 1;
        }
        Ok(done)
    }

    /// Run up to `steps` batches of this epoch through `step(k, batch)`, preparing (decoding,
    /// resizing, augmenting) batch `k+1` on a background thread while `step` runs on batch
    /// `k`; stacking onto `device` stays on the calling thread. Returns the number of batches
    /// run: fewer than `steps` at the end of the epoch, which — unlike [`Self::next_batch`] —
    /// is not started automatically (call [`Self::next_epoch`]). The position advances by
    /// exactly the batches handed to `step`, so [`Self::state`] taken afterwards resumes at
    /// the right batch. Same batches, in the same order, as
    /// [`Self::next_batch`].
    pub fn run_batches<F>(&mut self, steps: usize, device: &Device, mut step: F) -> Result<usize>
    where
        S: Send,
        F: FnMut(usize, S::Batch) -> Result<()>,
    {
        self.run_shard_batches(steps, device, (0, 1), |k, batch| match batch {
            Some(b) => step(k, b),
            None => Err(Error::Data {
                msg: format!("batch {k} of the epoch is empty"),
            }),
        })
    }

    /// Decode every item into the cache now (in parallel); no-op without a cache.
    pub fn warm_cache(&self) -> Result<()> {
        if self.cache.is_some() {
            self.indices
                .par_iter()
                .try_for_each(|&i| self.get_item(i).map(|_| ()))?;
        }
        Ok(())
    }
}

/// Rank `rank`'s part of the positions `range` split over `ranks` data-parallel processes:
/// contiguous, in rank order, sizes differing by at most one (the first `len % ranks` ranks
/// take one more); empty for every rank past the batch's length.
pub fn shard_range(
    range: std::ops::Range<usize>,
    rank: usize,
    ranks: usize,
) -> std::ops::Range<usize> {
    let ranks = ranks.max(1);
    let len = range.len();
    let (base, extra) = (len / ranks, len % ranks);
    let start = range.start + rank.min(ranks) * base + rank.min(extra);
    let n = if rank < ranks {
        base + usize::from(rank < extra)
    } else {
        0
    };
    start.min(range.end)..(start + n).min(range.end)
}

/// What preparing a batch reads of a [`Loader`] (shared with the prefetch thread).
struct Parts<'a, S: Source> {
    source: &'a S,
    cache: &'a Option<Vec<OnceLock<S::Item>>>,
    order: &'a [usize],
    epoch: u64,
    seed: u64,
    augment: bool,
}

impl<S: Source> Clone for Parts<'_, S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<S: Source> Copy for Parts<'_, S> {}

fn get_item<S: Source>(
    source: &S,
    cache: &Option<Vec<OnceLock<S::Item>>>,
    epoch: u64,
    index: usize,
) -> Result<S::Item> {
    if source.streaming() {
        return source.load_at(epoch, index);
    }
    match cache {
        Some(c) => {
            if let Some(it) = c[index].get() {
                return Ok(it.clone());
            }
            let it = source.load(index)?;
            let _ = c[index].set(it.clone());
            Ok(it)
        }
        None => source.load(index),
    }
}

/// Decode, resize and augment the items at positions `range` of the epoch's order, in
/// parallel; the augmentation of position `p` uses `Rng::derive(seed, "augment/epoch/p")`.
fn prepare_range<S: Source>(
    p: Parts<'_, S>,
    range: std::ops::Range<usize>,
) -> Result<Vec<S::Ready>> {
    range
        .into_par_iter()
        .map(|pos| {
            let item = get_item(p.source, p.cache, p.epoch, p.order[pos])?;
            let mut rng = Rng::derive(p.seed, &format!("augment/{}/{pos}", p.epoch));
            Ok(p.source.prepare(item, &mut rng, p.augment))
        })
        .collect()
}

/// Kvasir-SEG samples at input size `size`.
#[derive(Debug, Clone)]
pub struct SegSource {
    pub dataset: KvasirDataset,
    pub size: usize,
    pub resize: Resize,
    pub augment: SegAugment,
    /// Prompt sets to sample from each (augmented) mask; `None`: prompt-free, nothing drawn.
    pub prompts: Option<PromptSampling>,
}

/// How a [`SegSource`] seeds its prompt sampling (see [`super::prompts`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PromptSampling {
    pub spec: PromptSpec,
    /// `Some(seed)`: fixed per image ([`prompts::fixed_rng`]`(seed, id)`, evaluation);
    /// `None`: drawn from the loader's per-(seed, epoch, position) generator after the
    /// augmentation (training: fresh prompts every epoch, resumable with the loader).
    pub fixed_seed: Option<u64>,
}

impl Source for SegSource {
    type Item = PackedSegSample;
    type Ready = SegSample;
    type Batch = SegBatch;
    fn len(&self) -> usize {
        self.dataset.len()
    }
    fn load(&self, index: usize) -> Result<PackedSegSample> {
        self.dataset.load_packed(index, self.size, self.resize)
    }
    fn prepare(&self, item: PackedSegSample, rng: &mut Rng, augment: bool) -> SegSample {
        let mut item = item.unpack();
        if augment {
            self.augment.apply(&mut item, rng);
        }
        if let Some(ps) = &self.prompts {
            let mask: Vec<u8> = item.mask.iter().map(|&v| u8::from(v >= 0.5)).collect();
            let mut fixed;
            let r = match ps.fixed_seed {
                Some(seed) => {
                    fixed = prompts::fixed_rng(seed, &item.id);
                    &mut fixed
                }
                None => rng,
            };
            // The only failure is a mask that is not S×S, which `collate` refuses by name.
            item.prompts = prompts::sample(&mask, self.size, &ps.spec, r).unwrap_or_default();
        }
        item
    }
    fn collate(&self, items: Vec<SegSample>, device: &Device) -> Result<SegBatch> {
        kvasir::SegBatch::collate(&items, device)
    }
}

/// A batch of classification images.
#[derive(Debug, Clone)]
pub struct ClsBatch {
    /// `[B, 3, S, S]` f32 RGB in [0, 1]; with two views, `[2B, 3, S, S]` (all first views,
    /// then all second views, in the same sample order).
    pub images: Tensor,
    /// `[B]` (or `[2B]`) u32 class ids.
    pub labels: Tensor,
}

/// A resized classification item (u8, as cached).
#[derive(Debug, Clone)]
pub struct ClsItem {
    /// `[3, S, S]` RGB bytes, CHW.
    pub image: Vec<u8>,
    pub label: u32,
}

/// Classification samples at input size `size` (squashed), one or two augmented views.
#[derive(Debug, Clone)]
pub struct ClsSource {
    pub dataset: ClsDataset,
    pub size: usize,
    pub augment: ClsAugment,
    /// 1 = ordinary batches, 2 = SupCon pairs (see [`ClsBatch`]).
    pub views: usize,
}

impl Source for ClsSource {
    type Item = ClsItem;
    type Ready = (Vec<Vec<f32>>, u32);
    type Batch = ClsBatch;
    fn len(&self) -> usize {
        self.dataset.len()
    }
    fn load(&self, index: usize) -> Result<ClsItem> {
        if self.size == 0 {
            return Err(Error::Config {
                field: "size".into(),
                msg: "input size must be at least 1".into(),
            });
        }
        let img = self.dataset.load_rgb(index)?;
        Ok(ClsItem {
            image: resize::resize_rgb_chw_u8(&img, self.size, Resize::Squash),
            label: self.dataset.samples[index].label,
        })
    }
    fn prepare(&self, item: ClsItem, rng: &mut Rng, augment: bool) -> Self::Ready {
        let image: Vec<f32> = item.image.iter().map(|&v| v as f32 / 255.0).collect();
        let views = (0..self.views.max(1))
            .map(|_| {
                if augment {
                    self.augment.apply(&image, self.size, rng)
                } else {
                    image.clone()
                }
            })
            .collect();
        (views, item.label)
    }
    fn collate(&self, items: Vec<Self::Ready>, device: &Device) -> Result<ClsBatch> {
        let s = self.size;
        let v = self.views.max(1);
        let b = items.len();
        let mut images = Vec::with_capacity(v * b * 3 * s * s);
        let mut labels = Vec::with_capacity(v * b);
        for k in 0..v {
            for (views, label) in &items {
                images.extend_from_slice(&views[k]);
                labels.push(*label);
            }
        }
        Ok(ClsBatch {
            images: Tensor::from_vec(images, (v * b, 3, s, s), device)?,
            labels: Tensor::from_vec(labels, v * b, device)?,
        })
    }
}

/// Convenience: decode one classification image to `[3, S, S]` (no augmentation).
pub fn cls_image(ds: &ClsDataset, index: usize, size: usize) -> Result<Vec<f32>> {
    let img = ds.load_rgb(index)?;
    Ok(resize::resize_rgb_chw(&img, size, Resize::Squash))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Items are their own index; a batch is the list of items.
    struct Numbers(usize);

    impl Source for Numbers {
        type Item = usize;
        type Ready = usize;
        type Batch = Vec<usize>;
        fn len(&self) -> usize {
            self.0
        }
        fn load(&self, index: usize) -> Result<usize> {
            Ok(index)
        }
        fn prepare(&self, item: usize, _rng: &mut Rng, _augment: bool) -> usize {
            item
        }
        fn collate(&self, items: Vec<usize>, _device: &Device) -> Result<Vec<usize>> {
            Ok(items)
        }
    }

    fn epoch(l: &mut Loader<Numbers>) -> Vec<Vec<usize>> {
        let mut out = Vec::new();
        while let Some(b) = l.next_batch(&Device::Cpu).unwrap() {
            out.push(b);
        }
        out
    }

    #[test]
    fn drop_last_shuffle_and_eval_order() {
        let mut cfg = LoaderConfig::train(3, 9);
        cfg.drop_last = true;
        let mut l = Loader::new(Numbers(20), (0..10).collect(), cfg).unwrap();
        assert_eq!(l.batches_per_epoch(), 3);
        let e0 = epoch(&mut l);
        assert_eq!(e0.len(), 3);
        assert!(e0.iter().all(|b| b.len() == 3));
        let mut all: Vec<usize> = e0.concat();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 9, "no index twice within an epoch");
        assert_eq!(l.epoch(), 1);
        let e1 = epoch(&mut l);
        assert_ne!(e0, e1, "each epoch is reshuffled");

        let mut ev = Loader::all(Numbers(5), LoaderConfig::eval(2)).unwrap();
        assert_eq!(epoch(&mut ev), vec![vec![0, 1], vec![2, 3], vec![4]]);
        assert!(Loader::new(Numbers(5), vec![7], LoaderConfig::eval(2)).is_err());
        assert!(Loader::all(Numbers(5), LoaderConfig::eval(0)).is_err());
    }

    #[test]
    fn shards_split_a_batch_contiguously_and_completely() {
        for len in 0..9 {
            for ranks in 1..5 {
                let parts: Vec<_> = (0..ranks)
                    .map(|r| shard_range(10..10 + len, r, ranks))
                    .collect();
                let all: Vec<usize> = parts.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(
                    all,
                    (10..10 + len).collect::<Vec<_>>(),
                    "{len} over {ranks}"
                );
                let (lo, hi) = (
                    parts.iter().map(|r| r.len()).min(),
                    parts.iter().map(|r| r.len()).max(),
                );
                assert!(hi.unwrap() - lo.unwrap() <= 1);
            }
        }
        // Two ranks walk the same batches (the same state) and see their own halves; a rank
        // past the last batch's length gets `None`.
        let cfg = LoaderConfig::train(3, 4);
        let mut whole = Loader::new(Drawn(12), (0..7).collect(), cfg.clone()).unwrap();
        let mut seen: Vec<Vec<(usize, u64)>> = vec![Vec::new(); 3];
        let mut states = Vec::new();
        for rank in 0..2 {
            let mut l = Loader::new(Drawn(12), (0..7).collect(), cfg.clone()).unwrap();
            let n = l
                .run_shard_batches(5, &Device::Cpu, (rank, 2), |k, b| {
                    if let Some(b) = b {
                        seen[k].extend(b);
                    } else {
                        assert_eq!(
                            (rank, k),
                            (1, 2),
                            "only rank 1's part of the last batch is empty"
                        );
                    }
                    Ok(())
                })
                .unwrap();
            assert_eq!(n, 3);
            states.push(l.state());
        }
        for (k, batch) in seen.iter().enumerate() {
            assert_eq!(
                Some(batch.clone()),
                whole.next_batch(&Device::Cpu).unwrap(),
                "batch {k}"
            );
        }
        assert_eq!(states[0], states[1]);
        assert_eq!(states[0], whole.state());
        let mut s = Loader::new(Drawn(12), (0..7).collect(), cfg).unwrap();
        assert!(s.skip_batch() && s.skip_batch() && s.skip_batch() && !s.skip_batch());
        assert_eq!(s.state().position, 7);
    }

    /// Items paired with a draw from their augmentation generator, so that a batch shows
    /// both the order and the per-item randomness.
    struct Drawn(usize);

    impl Source for Drawn {
        type Item = usize;
        type Ready = (usize, u64);
        type Batch = Vec<(usize, u64)>;
        fn len(&self) -> usize {
            self.0
        }
        fn load(&self, index: usize) -> Result<usize> {
            if index == 13 {
                return Err(Error::Data {
                    msg: "item 13 is unreadable".into(),
                });
            }
            Ok(index)
        }
        fn prepare(&self, item: usize, rng: &mut Rng, _augment: bool) -> (usize, u64) {
            (item, rng.next_u64())
        }
        fn collate(&self, items: Vec<(usize, u64)>, _device: &Device) -> Result<Self::Batch> {
            Ok(items)
        }
    }

    /// The prefetching runner hands `step` exactly the batches `next_batch` gives (order and
    /// augmentation draws), stops at the epoch's end without starting the next, leaves the
    /// position where a resumed loader continues identically, and passes errors through.
    #[test]
    fn run_batches_matches_next_batch_and_resumes() {
        let cfg = LoaderConfig::train(3, 4);
        let mut a = Loader::new(Drawn(12), (0..11).collect(), cfg.clone()).unwrap();
        let mut b = Loader::new(Drawn(12), (0..11).collect(), cfg.clone()).unwrap();
        let mut seen = Vec::new();
        let n = b
            .run_batches(2, &Device::Cpu, |k, batch| {
                seen.push((k, batch));
                Ok(())
            })
            .unwrap();
        assert_eq!(n, 2);
        for (k, batch) in &seen {
            assert_eq!(
                Some(batch.clone()),
                a.next_batch(&Device::Cpu).unwrap(),
                "batch {k}"
            );
        }
        assert_eq!(a.state(), b.state());
        // The rest of the epoch: 11 items in batches of 3 → 2 more (3 and 2 items), then stop.
        let mut rest = Vec::new();
        let n = b
            .run_batches(10, &Device::Cpu, |_, batch| {
                rest.push(batch);
                Ok(())
            })
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(rest.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 2]);
        for batch in &rest {
            assert_eq!(Some(batch.clone()), a.next_batch(&Device::Cpu).unwrap());
        }
        assert_eq!(b.epoch(), 0, "the next epoch is the caller's call");
        assert_eq!(b.run_batches(1, &Device::Cpu, |_, _| Ok(())).unwrap(), 0);

        // Errors from loading and from the step come back; nothing past them is counted.
        let mut c = Loader::new(Drawn(14), (10..14).collect(), LoaderConfig::eval(1)).unwrap();
        assert!(c.run_batches(4, &Device::Cpu, |_, _| Ok(())).is_err());
        let mut d = Loader::new(Drawn(12), (0..6).collect(), LoaderConfig::eval(2)).unwrap();
        let err = d.run_batches(3, &Device::Cpu, |k, _| {
            if k == 1 {
                Err(Error::msg("step failed"))
            } else {
                Ok(())
            }
        });
        assert!(err.is_err());
        assert_eq!(d.state().position, 2, "only the batch that finished counts");
    }
}
