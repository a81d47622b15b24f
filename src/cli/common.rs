//! Flags shared by several subcommands.

use gps_seg::device::{self, DeviceKind};

/// `--device cpu|cuda|auto`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// Compute device: cpu, cuda or auto (CUDA when built with it and a GPU is visible).
    #[arg(long, default_value = "auto")]
    pub device: String,
}

impl DeviceArgs {
    /// Resolve the device and print the one-line choice.
    pub fn resolve(&self) -> anyhow::Result<candle_core::Device> {
        let kind: DeviceKind = self.device.parse()?;
        let (dev, line) = device::resolve(kind)?;
        eprintln!("{line}");
        Ok(dev)
    }
}
