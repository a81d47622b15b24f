//! The library's error type. Every variant says *where*: a file, a tensor, a config field,
//! an ONNX node. The binary adds context with `anyhow` and prints the whole chain.

use std::path::PathBuf;

/// Errors raised by the gps-seg library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error from a Candle tensor operation.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A checkpoint lacks a tensor the model needs.
    #[error("missing tensor `{name}` (the model expects shape {expected:?})")]
    MissingTensor { name: String, expected: Vec<usize> },

    /// A checkpoint tensor has the wrong shape.
    #[error("tensor `{name}`: checkpoint has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        name: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },

    /// A checkpoint holds tensors the model does not use.
    #[error("{count} unexpected tensor(s) in checkpoint: {names}")]
    UnexpectedTensors { count: usize, names: String },

    /// Something is wrong with one named tensor.
    #[error("tensor `{name}`: {msg}")]
    Tensor { name: String, msg: String },

    /// A checkpoint or artifact file is unreadable or malformed.
    #[error("{}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },

    /// A config field has a bad value.
    #[error("config field `{field}`: {msg}")]
    Config { field: String, msg: String },

    /// Bad input data: one or more files with problems (each line names its file).
    #[error("{msg}")]
    Data { msg: String },

    /// ONNX export or ONNX Runtime error, naming the node, tensor or attribute.
    #[error("onnx: {0}")]
    Onnx(String),

    /// A numerical problem (NaN/Inf) detected at a named place.
    #[error("non-finite value: {0}")]
    NonFinite(String),

    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Msg(String),
}

/// Result alias for the library.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wrap an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A free-form message.
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }
}

/// Config checks shared by every model config; each error names its field.
pub mod check {
    use super::{Error, Result};

    /// `v` must lie in `lo..=hi`.
    pub fn range(field: &str, v: usize, lo: usize, hi: usize) -> Result<()> {
        if v < lo || v > hi {
            return Err(Error::Config {
                field: field.into(),
                msg: format!("{v} is outside {lo}..={hi}"),
            });
        }
        Ok(())
    }

    /// `v` must be finite and positive (an epsilon, a scale).
    pub fn positive_finite(field: &str, v: f64) -> Result<()> {
        if !(v.is_finite() && v > 0.0) {
            return Err(Error::Config {
                field: field.into(),
                msg: format!("{v} is not a finite positive number"),
            });
        }
        Ok(())
    }

    /// Input normalisation: every `mean` finite, every `std` finite and positive.
    pub fn norm_stats(mean: &[f32], std: &[f32]) -> Result<()> {
        if mean.iter().any(|m| !m.is_finite()) {
            return Err(Error::Config {
                field: "mean".into(),
                msg: format!("{mean:?} has a non-finite entry"),
            });
        }
        if std.iter().any(|&s| !(s.is_finite() && s > 0.0)) {
            return Err(Error::Config {
                field: "std".into(),
                msg: format!("{std:?} has a non-positive entry"),
            });
        }
        Ok(())
    }
}
