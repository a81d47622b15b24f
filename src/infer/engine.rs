//! Engines that turn a batch of images into mask logits: ONNX Runtime on an exported
//! prompt-free SAM graph ([`OrtEngine`], the serving path) and the Candle SAM itself
//! ([`CandleEngine`], for comparison). Both take RGB in [0, 1] `[N, 3, S, S]` and return
//! logits `[N, 1, S', S']` (S' = S for gps-seg's prompt-free export).

use super::model::OrtModel;
use super::runtime;
use crate::data::prompts::ObjectPrompt;
use crate::error::{Error, Result};
use crate::nn::RolePolicy;
use crate::progress::{Event, Observer};
use crate::sam::{Sam, SamConfig};
use crate::util::tensors::TensorMap;
use candle_core::{Device, Tensor};
use ndarray::ArrayD;
use std::path::{Path, PathBuf};

/// Mask logits of a batch: `data` is `[n, size, size]` row-major.
#[derive(Debug, Clone)]
pub struct Logits {
    pub n: usize,
    pub size: usize,
    pub data: Vec<f32>,
}

impl Logits {
    /// Image `i`'s `[size·size]` logits.
    pub fn image(&self, i: usize) -> &[f32] {
        let a = self.size * self.size;
        &self.data[i * a..(i + 1) * a]
    }
}

/// Something that segments a batch.
pub trait Engine {
    /// Short name for reports (`onnxruntime`, `candle`).
    fn name(&self) -> &'static str;
    /// Square input size S.
    fn input_size(&self) -> usize;
    /// One line describing the model and its input convention.
    fn describe(&self) -> String;
    /// `images`: `[n, 3, S, S]` RGB in [0, 1], row-major → logits `[n, 1, S', S']`.
    fn logits(&self, images: &[f32], n: usize) -> Result<Logits>;
    /// The files this engine's numbers come from, in load order, hashed by content into a
    /// sharded job's identity ([`super::identity`]); none for an engine built in memory.
    fn model_files(&self) -> Vec<PathBuf> {
        Vec::new()
    }
    /// Settings the numbers depend on that are not in [`Engine::model_files`] (empty: none).
    fn model_settings(&self) -> String {
        String::new()
    }
    /// Whether the engine segments from prompts ([`Engine::logits_prompted`]).
    fn takes_prompts(&self) -> bool {
        false
    }
    /// Prompted segmentation: `prompts[i]` are image `i`'s prompt sets (input-frame pixels)
    /// → united logits `[n, 1, S', S']`. Engines without prompts refuse.
    fn logits_prompted(
        &self,
        _images: &[f32],
        _n: usize,
        _prompts: &[&[ObjectPrompt]],
    ) -> Result<Logits> {
        Err(Error::Config {
            field: "prompts".into(),
            msg: format!(
                "the {} engine runs a prompt-free model; prompts need the prompted graphs \
                 (`gps-seg export --prompted`, then infer --model ENCODER --decoder DECODER)",
                self.name()
            ),
        })
    }
}

/// The input signature gps-seg's SAM graphs have: `image` of rank 4 with 3 channels.
pub const EXPECTED_INPUTS: [(&str, usize, Option<i64>); 1] = [("image", 4, Some(3))];

/// Largest square input a model may declare (bounded before any batch is allocated).
pub const MAX_INPUT_SIZE: usize = 4096;

/// Metadata key (written by `onnx::sam`) saying whether normalisation is in-graph.
const META_INPUT: &str = "gps_seg.input";
/// Metadata key holding the exporter's `SamConfig` as JSON.
const META_SAM_CONFIG: &str = "gps_seg.sam_config";

/// ONNX Runtime on a prompt-free SAM graph `image [N,3,S,S] → mask_logits [N,1,S,S]`.
#[derive(Debug)]
pub struct OrtEngine {
    model: OrtModel,
    size: usize,
    /// `Some((mean, std))` (0–255 scale) when the graph expects SAM-normalised input.
    normalize: Option<([f32; 3], [f32; 3])>,
    threads: usize,
}

impl OrtEngine {
    /// Find (and on a fresh machine fetch, with a one-line notice) the ONNX Runtime library,
    /// load `path` with `threads` intra-op threads (0 = ONNX Runtime's default) and check its
    /// signature: one input `image` of rank 4 with 3 channels, a square spatial size (from the
    /// input shape, else the metadata's SAM config), and a first output of rank 4 with 1
    /// channel. A mismatch is refused with the expected and found signatures.
    pub fn load(
        path: &Path,
        threads: usize,
        ort_lib: Option<&Path>,
        obs: &mut dyn Observer,
    ) -> Result<OrtEngine> {
        if !path.is_file() {
            return Err(Error::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file"),
            ));
        }
        let lib = runtime::ensure_with(ort_lib, true, &mut |l| {
            obs.event(Event::Info(l.to_string()))
        })?;
        let model = OrtModel::load_with(path, threads, Some(&lib))?;
        Self::from_model(model, threads)
    }

    /// Check an already loaded model (see [`OrtEngine::load`]).
    pub fn from_model(model: OrtModel, threads: usize) -> Result<OrtEngine> {
        model.expect_signature(&EXPECTED_INPUTS)?;
        let p = model.path().display().to_string();
        let meta_cfg: Option<SamConfig> = model
            .metadata
            .get(META_SAM_CONFIG)
            .and_then(|s| serde_json::from_str(s).ok());
        let shape = &model.inputs[0].shape;
        let size = match (shape[2], shape[3]) {
            (h, w) if h > 0 && h == w => h as usize,
            (h, w) if h > 0 && w > 0 => {
                return Err(Error::Onnx(format!(
                    "{p}: input `image` is {h}×{w}; gps-seg expects a square input"
                )))
            }
            _ => meta_cfg.as_ref().map(|c| c.image_size).ok_or_else(|| {
                Error::Onnx(format!(
                    "{p}: input `image` has a dynamic size and no `{META_SAM_CONFIG}` metadata \
                     says which; export it with a fixed size"
                ))
            })?,
        };
        if size > MAX_INPUT_SIZE {
            return Err(Error::Onnx(format!(
                "{p}: input `image` is {size}×{size}; gps-seg accepts at most \
                 {MAX_INPUT_SIZE}×{MAX_INPUT_SIZE} (SAM's own size is 1024)"
            )));
        }
        let out = model
            .outputs
            .first()
            .ok_or_else(|| Error::Onnx(format!("{p}: model has no outputs")))?;
        if out.shape.len() != 4 || out.shape[1] != 1 {
            return Err(Error::Onnx(format!(
                "{p}: unexpected outputs: expected [mask_logits rank 4 with 1 channel], found [{}]",
                model
                    .outputs
                    .iter()
                    .map(|o| o.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        let pre_normalised = model
            .metadata
            .get(META_INPUT)
            .is_some_and(|s| s.starts_with("SAM-normalised"));
        let normalize = if pre_normalised {
            let c = meta_cfg.ok_or_else(|| {
                Error::Onnx(format!(
                    "{p}: the graph expects SAM-normalised input but has no `{META_SAM_CONFIG}` \
                     metadata with pixel_mean/pixel_std"
                ))
            })?;
            Some((c.pixel_mean, c.pixel_std))
        } else {
            None
        };
        Ok(OrtEngine {
            model,
            size,
            normalize,
            threads,
        })
    }

    /// The ONNX Runtime session.
    pub fn model(&self) -> &OrtModel {
        &self.model
    }
}

impl Engine for OrtEngine {
    fn name(&self) -> &'static str {
        "onnxruntime"
    }

    fn model_files(&self) -> Vec<PathBuf> {
        super::identity::onnx_files(self.model.path())
    }

    fn input_size(&self) -> usize {
        self.size
    }

    fn describe(&self) -> String {
        let ins: Vec<String> = self.model.inputs.iter().map(|i| i.to_string()).collect();
        let outs: Vec<String> = self.model.outputs.iter().map(|o| o.to_string()).collect();
        format!(
            "onnxruntime {}: {} → {} ({}; {} intra-op threads)",
            self.model.path().display(),
            ins.join(", "),
            outs.join(", "),
            if self.normalize.is_some() {
                "SAM normalisation applied before the graph"
            } else {
                "RGB [0,1], normalisation in-graph"
            },
            if self.threads == 0 {
                "default".to_string()
            } else {
                self.threads.to_string()
            }
        )
    }

    fn logits(&self, images: &[f32], n: usize) -> Result<Logits> {
        let s = self.size;
        let mut data = images.to_vec();
        if let Some((mean, std)) = self.normalize {
            for (i, v) in data.iter_mut().enumerate() {
                let c = (i / (s * s)) % 3;
                *v = (*v * 255.0 - mean[c]) / std[c];
            }
        }
        let arr = ArrayD::from_shape_vec(vec![n, 3, s, s], data)
            .map_err(|e| Error::msg(format!("batch of {n} images at {s}×{s}: {e}")))?;
        let out = self.model.run_f32(&arr)?;
        array_to_logits(out, n, self.model.path())
    }
}

fn array_to_logits(out: ArrayD<f32>, n: usize, path: &Path) -> Result<Logits> {
    let shape = out.shape().to_vec();
    if shape.len() != 4 || shape[0] != n || shape[1] != 1 || shape[2] != shape[3] {
        return Err(Error::Onnx(format!(
            "{}: output shape {shape:?}, expected [{n}, 1, S, S]",
            path.display()
        )));
    }
    let size = shape[2];
    let data = match out.as_slice() {
        Some(s) => s.to_vec(),
        None => out.iter().copied().collect(),
    };
    Ok(Logits { n, size, data })
}

/// The Candle SAM (`Sam::forward_prompt_free`) with frozen weights.
pub struct CandleEngine {
    sam: Sam,
    cfg: SamConfig,
    device: Device,
    source: String,
    /// The checkpoint file, when loaded from one.
    weights: Option<PathBuf>,
}

impl std::fmt::Debug for CandleEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CandleEngine")
            .field("config", &self.cfg.name)
            .field("source", &self.source)
            .finish()
    }
}

impl CandleEngine {
    /// Load a checkpoint (`.safetensors` or `.pth`, position tables adapted to `cfg`).
    pub fn load(weights: &Path, cfg: &SamConfig, device: &Device) -> Result<CandleEngine> {
        let map = crate::sam::load_weights(weights, cfg, device)?;
        let mut e = Self::from_weights(map, cfg, device, weights.display().to_string())?;
        e.weights = Some(weights.to_path_buf());
        Ok(e)
    }

    /// Build from a tensor map (every tensor must be used).
    pub fn from_weights(
        map: TensorMap,
        cfg: &SamConfig,
        device: &Device,
        source: String,
    ) -> Result<CandleEngine> {
        let (sam, _) = crate::sam::build(cfg, Some(map), RolePolicy::AllFrozen, device, 0)?;
        Ok(CandleEngine {
            sam,
            cfg: cfg.clone(),
            device: device.clone(),
            source,
            weights: None,
        })
    }
}

impl Engine for CandleEngine {
    fn name(&self) -> &'static str {
        "candle"
    }

    fn model_files(&self) -> Vec<PathBuf> {
        self.weights.iter().cloned().collect()
    }

    fn model_settings(&self) -> String {
        // The config decides the architecture and how the checkpoint's tables are resized.
        serde_json::to_string(&self.cfg).unwrap_or_default()
    }

    fn input_size(&self) -> usize {
        self.cfg.image_size
    }

    fn describe(&self) -> String {
        format!(
            "candle SAM `{}` {}px from {} on {:?}",
            self.cfg.name, self.cfg.image_size, self.source, self.device
        )
    }

    fn logits(&self, images: &[f32], n: usize) -> Result<Logits> {
        let s = self.cfg.image_size;
        let x = Tensor::from_slice(images, (n, 3, s, s), &self.device)?;
        // One image chunk per thread on the CPU (`nn::split_forward`).
        let y = crate::nn::split_forward(&x, |x| self.sam.predict_prompt_free(x))?;
        let arr = super::model::tensor_to_array(&y)?;
        array_to_logits(arr, n, Path::new("candle SAM"))
    }
}
