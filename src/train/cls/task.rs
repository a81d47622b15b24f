//! Classification fine-tuning of a ViT or ConvNeXt with GPS and its baselines, as a [`Task`]
//! of the one training loop ([`crate::train::fit`]).
//!
//! Flow (GPS, Zhang et al., CVPR 2024, §3; `shared/notes/gps-method.md`): open data (train on
//! VTAB's `train800val200` / FGVC's train+val / ImageFolder's `train[+val]`, test on the
//! held-out split; an ImageFolder without split folders gets a seeded split written into the
//! run) → base weights (head re-initialised for the dataset's classes) → selection:
//! gradients of a head-free supervised contrastive loss (SupCon, T = 0.07) on two augmented
//! views per image, accumulated with the pretrained weights, then `Policy::classifier()` top-K
//! per row (or cross-entropy through the fresh head, the paper's ablation; or random /
//! magnitude at the same budget) → masked fine-tuning with Adam (head trainable),
//! cross-entropy, warm-up + cosine per step → top-1 accuracy on the held-out split every epoch
//! (picks the best epoch) → best epoch merged into a full checkpoint.
//! Baselines: full (AdamW), linear (head only), bias (BitFit: every bias + the head).

use crate::data::augment::ClsAugment;
use crate::data::loader::{ClsBatch, ClsSource, Loader, LoaderConfig};
use crate::error::{Error, Result};
use crate::gps::policy::{Policy, Rule, Treatment};
use crate::gps::select::Criterion;
use crate::metrics::{Accuracy, Metric};
use crate::models::Classifier;
use crate::nn::{ParamStore, RolePolicy};
use crate::progress::{Event, Observer};
use crate::train::fit::folder::roles_from_policy;
use crate::train::fit::schedule::Schedule;
use crate::train::loss::{cross_entropy, supcon};
use crate::train::task::{Curves, Fitted, Loaders, ScheduleUnit, SelectionSetup, Task};
use crate::util::fs::write_json_atomic;
use crate::util::tensors::TensorMap;
use crate::util::threads::on_worker;
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, D};
use std::path::Path;

use super::config::{ClsEval, ClsRunSummary, ClsSummary, ClsTrainConfig, SelectLoss};
use super::data::{base_weights, ClsData};
use crate::train::config::{Method, TrainCore};

/// The selection loss of one batch. SupCon: `batch` holds two views (`[2B, 3, S, S]`,
/// view-major, labels `[2B]`); the loss is computed on head-free features, so the head gets
/// no gradient. CE: logits through the head against the labels.
pub fn selection_loss(
    model: &Classifier,
    batch: &ClsBatch,
    loss: SelectLoss,
    temperature: f64,
) -> Result<Tensor> {
    match loss {
        SelectLoss::SupCon => {
            let n = batch.labels.dim(0)?;
            if n % 2 != 0 {
                return Err(Error::msg(format!(
                    "SupCon selection needs two views per image; got a batch of {n}"
                )));
            }
            let feats = model.features(&batch.images)?;
            supcon(&feats, &batch.labels.narrow(0, 0, n / 2)?, temperature)
        }
        SelectLoss::Ce => cross_entropy(&model.forward(&batch.images)?, &batch.labels),
    }
}

/// Roles of the whole-tensor baselines (`full`, `linear`, `bias`).
pub fn baseline_roles(base: &TensorMap, method: Method) -> RolePolicy {
    let rules = match method {
        Method::Full => return RolePolicy::AllTrainable,
        Method::Linear => vec![Rule::new("head.*", Treatment::Trainable)],
        _ => vec![
            Rule::new("head.*", Treatment::Trainable),
            Rule::new("*.bias", Treatment::Trainable),
        ],
    };
    let p = Policy {
        name: method.name().into(),
        rules,
        default: Treatment::Frozen,
    };
    roles_from_policy(base, &p)
}

/// Train (or resume) one classification run in `run_dir`.
pub fn train(
    cfg: &ClsTrainConfig,
    run_dir: &Path,
    device: &Device,
    resume: bool,
    obs: &mut dyn Observer,
) -> Result<ClsRunSummary> {
    crate::train::fit::fit(cfg, run_dir, device, resume, obs)
}

fn bad(field: &str, msg: &str) -> Result<()> {
    Err(Error::Config {
        field: field.into(),
        msg: msg.into(),
    })
}

impl Task for ClsTrainConfig {
    type Source = ClsSource;
    type Model = Classifier;
    type Data = ClsData;
    type Eval = ClsEval;
    /// 1 / 0 per evaluated image (correct or not), in the loader's order.
    type Kept = Vec<u8>;
    type Extra = ClsSummary;

    const METHODS: &'static [Method] = &[
        Method::Gps,
        Method::Full,
        Method::Linear,
        Method::Bias,
        Method::Random,
        Method::Magnitude,
    ];
    const NAME: &'static str = "classification";
    const CURVES: Curves = Curves {
        loss: "cross-entropy",
        score: "top-1",
        file: "accuracy.png",
    };

    fn core(&self) -> &TrainCore {
        &self.core
    }

    fn label(&self) -> String {
        ClsTrainConfig::label(self)
    }

    fn validate(&self, _device: &Device) -> Result<()> {
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad("temperature", "must be a positive number");
        }
        let supcon = self.method == Method::Gps && self.select_loss == SelectLoss::SupCon;
        if supcon && self.batch_size < 2 {
            return bad(
                "batch_size",
                "SupCon selection needs at least 2 images per batch",
            );
        }
        if self.warmup_epochs >= self.epochs && self.warmup_epochs > 0 {
            return bad("warmup_epochs", "must be smaller than epochs");
        }
        if !(0.0..=1.0).contains(&self.augment.hflip) {
            return bad("augment.hflip", "must be a probability in [0, 1]");
        }
        self.model.validate()
    }

    fn open(
        &self,
        run_dir: &Path,
        device: &Device,
        obs: &mut dyn Observer,
    ) -> Result<(ClsData, TensorMap)> {
        let data = ClsData::open(self, run_dir)?;
        obs.event(Event::Info(format!(
            "data: {} ({} train / {} test images, {} classes, split {})",
            self.data_dir.display(),
            data.train.len(),
            data.test.len(),
            data.train.num_classes,
            data.split
        )));
        write_json_atomic(&run_dir.join("model.json"), &data.model)?;
        let base = base_weights(&data.model, self.base.as_deref(), self.seed, device, obs)?;
        Ok((data, base))
    }

    fn baseline_roles(&self, base: &TensorMap) -> Result<RolePolicy> {
        Ok(baseline_roles(base, self.method))
    }

    fn build(&self, data: &ClsData, store: &ParamStore) -> Result<Classifier> {
        Classifier::new(&data.model, store)
    }

    fn loaders(&self, data: &ClsData) -> Result<Loaders<ClsSource>> {
        Ok(Loaders {
            train: data.train_loader(self)?,
            val: data.val_loader(self)?,
            test: data.test_loader(self)?,
        })
    }

    fn schedule(&self, steps_per_epoch: usize) -> (Schedule, ScheduleUnit) {
        let s = Schedule::WarmupCosine {
            lr: self.lr,
            min_lr: self.min_lr,
            warmup: self.warmup_epochs.saturating_mul(steps_per_epoch),
            total: self.epochs.saturating_mul(steps_per_epoch),
        };
        (s, ScheduleUnit::Step)
    }

    fn train_step(&self, model: &Classifier, batch: &ClsBatch) -> Result<(Tensor, GradStore)> {
        let loss = cross_entropy(&model.forward(&batch.images)?, &batch.labels)?;
        let grads = loss.backward()?;
        Ok((loss, grads))
    }

    /// Cross-entropy averaged over the batch's images.
    fn batch_mean_loss(&self) -> bool {
        true
    }

    fn batch_len(batch: &ClsBatch) -> Result<usize> {
        Ok(batch.labels.dim(0)?)
    }

    fn evaluate(
        &self,
        model: &Classifier,
        loader: &mut Loader<ClsSource>,
        device: &Device,
        obs: &mut dyn Observer,
    ) -> Result<(ClsEval, Vec<u8>)> {
        let (test_acc, test_loss, correct) = evaluate_per_image(model, loader, device, obs)?;
        Ok((
            ClsEval {
                test_acc,
                test_loss,
            },
            correct,
        ))
    }

    /// `scores.csv`: one line per test image at the chosen epoch (`index,correct`).
    fn write_best(&self, run_dir: &Path, _data: &ClsData, kept: &Vec<u8>) -> Result<()> {
        let mut s = String::from("index,correct\n");
        for (i, c) in kept.iter().enumerate() {
            s.push_str(&format!("{i},{c}\n"));
        }
        crate::util::fs::write_atomic(&run_dir.join("scores.csv"), s.as_bytes())
    }

    fn score(eval: &ClsEval) -> f64 {
        eval.test_acc
    }

    fn split_sizes(&self, data: &ClsData) -> [usize; 3] {
        [
            data.train.len(),
            data.val.as_ref().map_or(0, |v| v.len()),
            data.test.len(),
        ]
    }

    fn summary(&self, _data: &ClsData, f: &Fitted<ClsEval>) -> ClsSummary {
        ClsSummary {
            topk: self.topk,
            val_acc: f.best_val.test_acc,
            best_acc: f.best.test_acc,
            last_acc: f.last.test_acc,
            merged: f.merged.clone().unwrap_or_default(),
        }
    }

    fn selection(&self) -> Option<SelectionSetup> {
        let loss_name = match (self.method.criterion(), self.select_loss) {
            (Some(Criterion::Gradient), SelectLoss::SupCon) => {
                format!("supcon(T={})", self.temperature)
            }
            (Some(Criterion::Gradient), SelectLoss::Ce) => "cross-entropy (fresh head)".into(),
            _ => "none".into(),
        };
        Some(SelectionSetup {
            policy: Policy::classifier(),
            loss_name,
            phase: format!("select ({})", self.select_loss.name()),
        })
    }

    fn selection_loader(&self, data: &ClsData) -> Result<Loader<ClsSource>> {
        let (aug, views) = match self.select_loss {
            SelectLoss::SupCon => (ClsAugment::contrastive(), 2),
            SelectLoss::Ce => (self.augment, 1),
        };
        let lc = LoaderConfig {
            cache: ClsData::cacheable(&data.train, self),
            ..LoaderConfig::train(self.batch_size, self.seed ^ 0x5e1ec7)
        };
        Loader::all(data.source(&data.train, self, aug, views), lc)
    }

    fn selection_loss(&self, model: &Classifier, batch: &ClsBatch) -> Result<Tensor> {
        selection_loss(model, batch, self.select_loss, self.temperature)
    }
}

/// Top-1 accuracy and mean cross-entropy of `model` over a loader (one pass).
pub fn evaluate(
    model: &Classifier,
    loader: &mut Loader<ClsSource>,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<(f64, f64)> {
    evaluate_per_image(model, loader, device, obs).map(|(a, l, _)| (a, l))
}

/// [`evaluate`], also returning 1 / 0 per image (correct or not) in the loader's order.
pub fn evaluate_per_image(
    model: &Classifier,
    loader: &mut Loader<ClsSource>,
    device: &Device,
    obs: &mut dyn Observer,
) -> Result<(f64, f64, Vec<u8>)> {
    let mut correct = Vec::with_capacity(loader.len());
    let mut acc = Accuracy::default();
    let total = loader.batches_per_epoch();
    obs.event(Event::PhaseStart {
        name: "eval".into(),
        total,
    });
    let (mut loss_sum, mut n) = (0.0f64, 0usize);
    let mut done = 0;
    while let Some(batch) = loader.next_batch(device)? {
        let logits = on_worker(|| model.forward(&batch.images))?.detach();
        let b = batch.labels.dim(0)?;
        loss_sum += cross_entropy(&logits, &batch.labels)?.to_scalar::<f32>()? as f64 * b as f64;
        n += b;
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let truth = batch.labels.to_vec1::<u32>()?;
        let pairs: Vec<(u32, u32)> = pred.into_iter().zip(truth).collect();
        correct.extend(pairs.iter().map(|(p, t)| u8::from(p == t)));
        acc.update(&pairs);
        done += 1;
        obs.event(Event::Step {
            done,
            loss: None,
            lr: None,
            images_per_s: None,
        });
    }
    loader.next_epoch();
    let a = acc.compute();
    let l = loss_sum / n.max(1) as f64;
    obs.event(Event::PhaseEnd {
        summary: format!("top-1 {:.2}%  loss {l:.4}  ({n} images)", 100.0 * a),
    });
    Ok((a, l, correct))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::ClassifierConfig;

    #[test]
    fn methods_and_losses_parse() {
        for m in Method::ALL {
            assert_eq!(m.parse::<Method>().unwrap().name(), m);
        }
        assert!("lora".parse::<Method>().is_err());
        assert_eq!("ce".parse::<SelectLoss>().unwrap(), SelectLoss::Ce);
        assert!("mse".parse::<SelectLoss>().is_err());
    }

    #[test]
    fn baseline_roles_pick_head_and_biases() {
        let cfg = ClassifierConfig::preset("vit_tiny_cpu", 3).unwrap();
        let store = ParamStore::init(&Device::Cpu, 0);
        Classifier::new(&cfg, &store).unwrap();
        let base = store.current_tensors().unwrap();
        let RolePolicy::Map(lin) = baseline_roles(&base, Method::Linear) else {
            panic!("linear must be a map")
        };
        let mut names: Vec<_> = lin.keys().cloned().collect();
        names.sort();
        assert_eq!(names, vec!["head.bias", "head.weight"]);
        let RolePolicy::Map(bias) = baseline_roles(&base, Method::Bias) else {
            panic!("bias must be a map")
        };
        assert!(bias.contains_key("blocks.0.attn.qkv.bias"));
        assert!(bias.contains_key("head.weight"));
        assert!(!bias.contains_key("blocks.0.attn.qkv.weight"));
        assert!(bias
            .keys()
            .all(|n| n.ends_with(".bias") || n.starts_with("head.")));
    }
}
