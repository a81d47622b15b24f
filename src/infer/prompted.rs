//! Prompted inference with ONNX Runtime on the `export --prompted` pair: the image encoder
//! (`image [N,3,S,S] → image_embeddings [N,C,g,g]`) and the prompted decoder
//! (`image_embeddings, point_coords [N,P,2], point_labels [N,P] → masks [N,M,4g,4g],
//! iou_predictions [N,M]`, labels 1 fg / 0 bg / 2, 3 box corners / −1 padding).
//!
//! Per image, each object's prompt set is decoded on its own (points first, then the box's two
//! corners; without a box Meta's padding point `(0, 0)` / −1 is appended, as `SamPredictor`
//! does). A single point without a box is ambiguous: the multimask output with the highest
//! predicted IoU is taken; otherwise the single-mask output. The low-res logits are resized
//! bilinearly to `S × S` (the same op as training's evaluation) and the objects are united by
//! the pixelwise maximum — the maximum of their probabilities, since the sigmoid is monotonic.
//! An image without prompts gets [`NO_OBJECT_LOGIT`] everywhere (probability 0).

use super::engine::{Engine, Logits};
use super::model::OrtModel;
use super::runtime;
use crate::data::prompts::ObjectPrompt;
use crate::error::{Error, Result};
use crate::progress::{Event, Observer};
use ndarray::ArrayD;
use std::path::Path;

/// The logit of "no object here" (its sigmoid is exactly 0 in f32).
pub const NO_OBJECT_LOGIT: f32 = -1.0e4;

/// Whether SAM's multimask output answers this prompt set: one point and no box.
pub fn is_ambiguous(o: &ObjectPrompt) -> bool {
    o.bbox.is_none() && o.points.len() == 1
}

/// The decoder's point inputs of one prompt set in Meta's ONNX convention: `(coords [P·2],
/// labels [P])`.
pub fn onnx_points(o: &ObjectPrompt) -> (Vec<f32>, Vec<f32>) {
    let mut coords: Vec<f32> = o.points.iter().flatten().copied().collect();
    let mut labels = o.labels.clone();
    match o.bbox {
        Some(b) => {
            coords.extend_from_slice(&b);
            labels.extend_from_slice(&[2.0, 3.0]);
        }
        None => {
            coords.extend_from_slice(&[0.0, 0.0]);
            labels.push(-1.0);
        }
    }
    (coords, labels)
}

/// ONNX Runtime on a prompted encoder + decoder pair.
#[derive(Debug)]
pub struct PromptedOrtEngine {
    encoder: OrtModel,
    decoder: OrtModel,
    size: usize,
    threads: usize,
}

impl PromptedOrtEngine {
    /// Load both graphs (finding or fetching the ONNX Runtime library as [`super::OrtEngine`]
    /// does) and check their signatures; the encoder must normalise in-graph (the default
    /// export) and have a fixed square input.
    pub fn load(
        encoder: &Path,
        decoder: &Path,
        threads: usize,
        ort_lib: Option<&Path>,
        obs: &mut dyn Observer,
    ) -> Result<PromptedOrtEngine> {
        for p in [encoder, decoder] {
            if !p.is_file() {
                return Err(Error::io(
                    p,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file"),
                ));
            }
        }
        let lib = runtime::ensure_with(ort_lib, true, &mut |l| {
            obs.event(Event::Info(l.to_string()))
        })?;
        let encoder = OrtModel::load_with(encoder, threads, Some(&lib))?;
        let decoder = OrtModel::load_with(decoder, threads, Some(&lib))?;
        Self::from_models(encoder, decoder, threads)
    }

    /// The image encoder's session.
    pub fn encoder(&self) -> &OrtModel {
        &self.encoder
    }

    /// The prompted decoder's session.
    pub fn decoder(&self) -> &OrtModel {
        &self.decoder
    }

    /// `<dir>/<stem>_decoder.onnx` for the image encoder `<dir>/<stem>.onnx` (the pair
    /// `export --prompted` writes).
    pub fn decoder_path(encoder: &Path) -> std::path::PathBuf {
        let stem = encoder
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        encoder.with_file_name(format!("{stem}_decoder.onnx"))
    }

    /// The pair from two loaded sessions (signatures, outputs and input size checked).
    pub fn from_models(
        encoder: OrtModel,
        decoder: OrtModel,
        threads: usize,
    ) -> Result<PromptedOrtEngine> {
        encoder.expect_signature(&[("image", 4, Some(3))])?;
        decoder.expect_signature(&[
            ("image_embeddings", 4, None),
            ("point_coords", 3, None),
            ("point_labels", 2, None),
        ])?;
        let ep = encoder.path().display().to_string();
        if encoder
            .metadata
            .get("gps_seg.input")
            .is_some_and(|s| s.starts_with("SAM-normalised"))
        {
            return Err(Error::Onnx(format!(
                "{ep}: this image encoder expects SAM-normalised input; export it without \
                 --no-normalize for prompted inference"
            )));
        }
        let shape = &encoder.inputs[0].shape;
        let size = match (shape[2], shape[3]) {
            (h, w) if h > 0 && h == w && (h as usize) <= super::engine::MAX_INPUT_SIZE => {
                h as usize
            }
            (h, w) => {
                return Err(Error::Onnx(format!(
                    "{ep}: input `image` is {h}×{w}; expected a fixed square size up to {}",
                    super::engine::MAX_INPUT_SIZE
                )))
            }
        };
        for (m, names) in [
            (&encoder, &["image_embeddings"][..]),
            (&decoder, &["masks", "iou_predictions"][..]),
        ] {
            for n in names {
                if !m.outputs.iter().any(|o| o.name == *n) {
                    return Err(Error::Onnx(format!(
                        "{}: no output `{n}` (outputs: {})",
                        m.path().display(),
                        m.outputs
                            .iter()
                            .map(|o| o.to_string())
                            .collect::<Vec<_>>()
                            .join("; ")
                    )));
                }
            }
        }
        Ok(PromptedOrtEngine {
            encoder,
            decoder,
            size,
            threads,
        })
    }

    fn output(outs: Vec<(String, ArrayD<f32>)>, name: &str, path: &Path) -> Result<ArrayD<f32>> {
        outs.into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
            .ok_or_else(|| Error::Onnx(format!("{}: no output `{name}`", path.display())))
    }

    /// The united `[S·S]` logits of one image's prompt sets from its embeddings
    /// `[1, C, g, g]`.
    fn image_logits(&self, emb: &ArrayD<f32>, prompts: &[ObjectPrompt]) -> Result<Vec<f32>> {
        let s = self.size;
        let mut out = vec![NO_OBJECT_LOGIT; s * s];
        let dp = self.decoder.path();
        for (k, o) in prompts.iter().enumerate() {
            let (coords, labels) = onnx_points(o);
            let p = labels.len();
            let bad = |e: ndarray::ShapeError| Error::msg(format!("prompt set {k}: {e}"));
            let c = ArrayD::from_shape_vec(vec![1, p, 2], coords).map_err(bad)?;
            let l = ArrayD::from_shape_vec(vec![1, p], labels).map_err(bad)?;
            let outs = self.decoder.run(&[
                ("image_embeddings", emb),
                ("point_coords", &c),
                ("point_labels", &l),
            ])?;
            let iou = Self::output(outs.clone(), "iou_predictions", dp)?;
            let masks = Self::output(outs, "masks", dp)?;
            let shape = masks.shape().to_vec();
            let (m, lh, lw) = match shape.as_slice() {
                [1, m, h, w] if *m >= 1 && iou.len() == *m => (*m, *h, *w),
                _ => {
                    return Err(Error::Onnx(format!(
                    "{}: masks {shape:?} / iou_predictions {:?}, expected [1, M, l, l] / [1, M]",
                    dp.display(),
                    iou.shape()
                )))
                }
            };
            let pick = if is_ambiguous(o) && m > 1 {
                let iou: Vec<f32> = iou.iter().copied().collect();
                let mut best = 1;
                for j in 2..m {
                    if iou[j] > iou[best] {
                        best = j;
                    }
                }
                best
            } else {
                0
            };
            let flat: Vec<f32> = masks.iter().copied().collect();
            let a = lh * lw;
            let low = candle_core::Tensor::from_slice(
                &flat[pick * a..(pick + 1) * a],
                (1, 1, lh, lw),
                &candle_core::Device::Cpu,
            )?;
            let up = crate::nn::layers::resize_bilinear(&low, s, s)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (acc, v) in out.iter_mut().zip(up) {
                *acc = acc.max(v);
            }
        }
        Ok(out)
    }
}

impl Engine for PromptedOrtEngine {
    fn name(&self) -> &'static str {
        "onnxruntime-prompted"
    }

    fn model_files(&self) -> Vec<std::path::PathBuf> {
        let mut v = super::identity::onnx_files(self.encoder.path());
        v.extend(super::identity::onnx_files(self.decoder.path()));
        v
    }

    fn input_size(&self) -> usize {
        self.size
    }

    fn describe(&self) -> String {
        format!(
            "onnxruntime prompted pair {} + {} ({} px, one decoder run per prompt set, objects \
             united by max; {} intra-op threads)",
            self.encoder.path().display(),
            self.decoder.path().display(),
            self.size,
            if self.threads == 0 {
                "default".to_string()
            } else {
                self.threads.to_string()
            }
        )
    }

    fn logits(&self, _images: &[f32], _n: usize) -> Result<Logits> {
        Err(Error::Config {
            field: "prompts".into(),
            msg: "the prompted graphs need prompts: give --prompts FILE or --prompt-from-masks"
                .into(),
        })
    }

    fn takes_prompts(&self) -> bool {
        true
    }

    fn logits_prompted(
        &self,
        images: &[f32],
        n: usize,
        prompts: &[&[ObjectPrompt]],
    ) -> Result<Logits> {
        let s = self.size;
        if prompts.len() != n || images.len() != n * 3 * s * s {
            return Err(Error::msg(format!(
                "prompted batch: {n} images, {} prompt lists, {} values",
                prompts.len(),
                images.len()
            )));
        }
        let arr = ArrayD::from_shape_vec(vec![n, 3, s, s], images.to_vec())
            .map_err(|e| Error::msg(format!("batch of {n} images at {s}×{s}: {e}")))?;
        let emb = Self::output(
            self.encoder.run(&[("image", &arr)])?,
            "image_embeddings",
            self.encoder.path(),
        )?;
        let mut data = Vec::with_capacity(n * s * s);
        for (i, ps) in prompts.iter().enumerate() {
            let one = emb
                .index_axis(ndarray::Axis(0), i)
                .insert_axis(ndarray::Axis(0))
                .to_owned();
            data.extend(self.image_logits(&one, ps)?);
        }
        Ok(Logits { n, size: s, data })
    }
}
