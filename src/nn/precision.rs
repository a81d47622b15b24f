//! Compute precision of SAM's image encoder (`--dtype f32|bf16|f16`): autocast in the manner of
//! PyTorch's `torch.autocast`, written out by hand because Candle has none.
//!
//! The master weights stay f32 in the [`ParamStore`](super::ParamStore) (so the optimiser state
//! and the GPS sparse deltas stay f32). In a low-precision forward the activations are cast to
//! the compute dtype once, at the encoder's input, and each layer casts its weight to the dtype
//! of the activation it meets ([`autocast`]); `to_dtype` is differentiable in Candle, so the
//! gradients come back to the f32 vars as f32. Layer norms and the attention softmax compute
//! in f32 ([`upcast`], then cast back). With `Precision::F32` no cast happens anywhere: the
//! helpers return their input when the dtypes already agree, and every fused CPU kernel
//! ([`super::kernels::use_fused`]) still applies.
//!
//! Low precision is meant for CUDA (tensor cores); on the CPU Candle widens bf16 matmuls to f32
//! and runs several ops slowly or not at all in bf16, so the CLI refuses it there
//! ([`Precision::check_device`]). The library itself runs bf16/f16 on the CPU too — that is how
//! the tests check the machinery without a GPU.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The compute dtype of the image encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32 (the reference path, and the only one on the CPU).
    #[default]
    F32,
    /// bfloat16 matmuls and activations; layer norms and softmax in f32.
    Bf16,
    /// float16 matmuls and activations; layer norms and softmax in f32.
    F16,
}

impl Precision {
    pub const ALL: [&'static str; 3] = ["f32", "bf16", "f16"];

    /// The Candle dtype the encoder computes in.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// Whether this is a reduced precision (bf16 or f16).
    pub fn is_low(self) -> bool {
        self != Precision::F32
    }

    /// Refuse a reduced precision on a CPU device (one line, names the flag): the CPU path
    /// computes in f32.
    pub fn check_device(self, device: &Device) -> Result<()> {
        if self.is_low() && device.is_cpu() {
            return Err(Error::msg(format!(
                "--dtype {} runs on CUDA only; the CPU path computes in f32",
                self.name()
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            "f16" | "fp16" | "float16" | "half" => Ok(Precision::F16),
            other => Err(Error::Config {
                field: "dtype".into(),
                msg: format!("`{other}` is not one of {}", Precision::ALL.join(", ")),
            }),
        }
    }
}

/// Whether `dt` is a reduced float type (bf16, f16) that autocast computes in.
pub fn is_low(dt: DType) -> bool {
    matches!(dt, DType::BF16 | DType::F16)
}

/// A weight (or bias, or table) `w` in the dtype of the activation it meets: cast when that
/// activation is bf16/f16 and `w` is not (autocast), else `w` itself. Only reduced activation
/// dtypes trigger a cast, so an f32/f64 mix-up still fails loudly in the op.
pub fn autocast(w: Tensor, activation: DType) -> Result<Tensor> {
    if is_low(activation) && w.dtype() != activation {
        Ok(w.to_dtype(activation)?)
    } else {
        Ok(w)
    }
}

/// Run `f` in f32 when `x` is bf16/f16 (`x` upcast, the result cast back to `x`'s dtype);
/// otherwise `f(x)` as is. For the ops autocast keeps in f32 (layer norm, softmax).
pub fn upcast(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    let dt = x.dtype();
    if is_low(dt) {
        Ok(f(&x.to_dtype(DType::F32)?)?.to_dtype(dt)?)
    } else {
        f(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_and_round_trips_through_serde() {
        for (s, p) in [
            ("f32", Precision::F32),
            ("BF16", Precision::Bf16),
            ("fp16", Precision::F16),
        ] {
            assert_eq!(s.parse::<Precision>().unwrap(), p);
            let j = serde_json::to_string(&p).unwrap();
            assert_eq!(j, format!("\"{}\"", p.name()));
            assert_eq!(serde_json::from_str::<Precision>(&j).unwrap(), p);
        }
        let e = "f8".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("f32, bf16, f16"), "{e}");
    }

    #[test]
    fn low_precision_on_cpu_is_a_one_line_error() {
        assert!(Precision::F32.check_device(&Device::Cpu).is_ok());
        let e = Precision::Bf16
            .check_device(&Device::Cpu)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "--dtype bf16 runs on CUDA only; the CPU path computes in f32"
        );
        assert!(!e.contains('\n'));
        let e = Precision::F16
            .check_device(&Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--dtype f16 runs on CUDA only"), "{e}");
    }

    #[test]
    fn autocast_and_upcast_leave_f32_alone() {
        let x = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let w = autocast(x.clone(), DType::F32).unwrap();
        assert_eq!(
            w.id(),
            x.id(),
            "f32 weight under f32 activations is not cast"
        );
        assert_eq!(
            autocast(x.clone(), DType::BF16).unwrap().dtype(),
            DType::BF16
        );
        let xb = x.to_dtype(DType::BF16).unwrap();
        let y = upcast(&xb, |t| {
            assert_eq!(t.dtype(), DType::F32);
            Ok((t * 2.0)?)
        })
        .unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        assert_eq!(
            y.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
            [2., 4., 6.]
        );
    }
}
