//! `NAME=FILE.onnx`: one task of `serve --task`, of a `--tasks-dir` entry and of `PUT /v1/tasks/NAME`.

use crate::error::{Error, Result};
use std::path::PathBuf;

/// `NAME=FILE.onnx` of `--task`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    pub name: String,
    pub model: PathBuf,
}

impl TaskSpec {
    /// Parse `NAME=FILE`: NAME of 1–64 characters from `A-Z a-z 0-9 _ - .`.
    pub fn parse(s: &str) -> Result<TaskSpec> {
        let bad = |m: String| Error::Config {
            field: "task".into(),
            msg: format!("`{s}`: {m} (expected NAME=FILE.onnx)"),
        };
        let (name, file) = s.split_once('=').ok_or_else(|| bad("no `=`".into()))?;
        let name = name.trim();
        if name.is_empty() || name.len() > 64 {
            return Err(bad("NAME must have 1 to 64 characters".into()));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(bad(format!(
                "NAME may hold only letters, digits, `_`, `-`, `.` (found `{c}`)"
            )));
        }
        if file.is_empty() {
            return Err(bad("FILE is empty".into()));
        }
        Ok(TaskSpec {
            name: name.to_string(),
            model: PathBuf::from(file),
        })
    }
}
