//! The binary under test and the ways the tests run it.

use std::path::Path;
use std::process::{Command, Output};

/// The binary under test: `GPS_SEG_TEST_BIN` when set (to run the CLI cases against another
/// build), else the one cargo built for these tests.
pub fn bin() -> String {
    std::env::var("GPS_SEG_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_gps-seg").into())
}

fn output(args: &[&str], cwd: Option<&Path>) -> Output {
    let mut cmd = Command::new(bin());
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    cmd.args(args).output().unwrap()
}

/// Runs the binary with `args` in `cwd`: (exit code, −1 when it has none; stdout + stderr).
pub fn run(args: &[&str], cwd: &Path) -> (i32, String) {
    let out = output(args, Some(cwd));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// [`run`], failing the test when the binary panicked.
pub fn gps_seg(args: &[&str], cwd: &Path) -> (i32, String) {
    let (code, text) = run(args, cwd);
    assert!(!text.contains("panicked"), "{args:?}: {text}");
    (code, text)
}

/// [`gps_seg`] in the repository root: (whether it succeeded, stdout + stderr).
pub fn gps_seg_ok(args: &[&str]) -> (bool, String) {
    let (code, text) = gps_seg(args, Path::new(env!("CARGO_MANIFEST_DIR")));
    (code == 0, text)
}

/// Runs the binary with `args` in the current folder: (exit code, stderr).
pub fn cli(args: &[&str]) -> (Option<i32>, String) {
    let out = output(args, None);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
