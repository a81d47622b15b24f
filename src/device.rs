//! Choosing the compute device: `cpu`, `cuda` or `auto` (CUDA when this binary has it and a
//! GPU is visible, else CPU). Asking for CUDA where it cannot work is an error, never a panic.

use crate::error::{Error, Result};
use candle_core::Device;
use std::str::FromStr;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceKind {
    Cpu,
    Cuda,
    #[default]
    Auto,
}

impl FromStr for DeviceKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" | "gpu" => Ok(DeviceKind::Cuda),
            "auto" => Ok(DeviceKind::Auto),
            other => Err(Error::Config {
                field: "device".into(),
                msg: format!("`{other}` is not one of cpu, cuda, auto"),
            }),
        }
    }
}

/// Whether this binary was built with the `cuda` feature.
pub fn cuda_compiled() -> bool {
    cfg!(feature = "cuda")
}

/// Resolve a device request; returns the device and a one-line description of the choice.
pub fn resolve(kind: DeviceKind) -> Result<(Device, String)> {
    match kind {
        DeviceKind::Cpu => Ok((Device::Cpu, "device: cpu".into())),
        DeviceKind::Cuda => {
            if !cuda_compiled() {
                return Err(Error::msg(
                    "--device cuda: this binary was built without CUDA support; \
                     rebuild with `--features cuda` (see scripts/build-cuda.sh)",
                ));
            }
            Device::new_cuda(0)
                .map(|d| (d, "device: cuda:0".into()))
                .map_err(|e| Error::msg(format!("--device cuda: no usable GPU is visible ({e})")))
        }
        DeviceKind::Auto => {
            if cuda_compiled() {
                if let Ok(d) = Device::new_cuda(0) {
                    return Ok((d, "device: cuda:0 (auto)".into()));
                }
                return Ok((Device::Cpu, "device: cpu (auto: no GPU visible)".into()));
            }
            Ok((Device::Cpu, "device: cpu (auto: built without CUDA)".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_request_without_feature_is_a_clear_error() {
        assert!(matches!(resolve(DeviceKind::Cpu), Ok((Device::Cpu, _))));
        if !cuda_compiled() {
            let e = resolve(DeviceKind::Cuda).unwrap_err().to_string();
            assert!(e.contains("without CUDA"), "{e}");
        }
        assert!("tpu".parse::<DeviceKind>().is_err());
    }
}
