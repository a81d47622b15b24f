"""The tiny demo run the tests compare against: `GPS_SEG_DEMO_RUN` (a `runs/demo-quick/gps`
folder, as CI passes after running `gps-seg demo --quick`), else a fresh `gps-seg demo --quick`
in a temporary folder, with the binary from `GPS_SEG_BIN`, this Python's environment
(`pip install gps-seg`), `PATH`, or the repository's `target/release/gps-seg`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def pytest_report_header(config: pytest.Config) -> str:
    import gps_seg

    return f"gps_seg: {Path(gps_seg.__file__).parent}"


def _gps_seg_binary() -> Path | None:
    candidates = [
        os.environ.get("GPS_SEG_BIN"),
        str(Path(sys.executable).parent / "gps-seg"),
        shutil.which("gps-seg"),
        str(REPO / "target" / "release" / "gps-seg"),
    ]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return Path(c)
    return None


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("GPS_SEG_DEMO_RUN")
    if given:
        run = Path(given)
    else:
        exe = _gps_seg_binary()
        if exe is None:
            pytest.fail(
                "no gps-seg binary: install the wheel, build with cargo, or set GPS_SEG_BIN "
                "(or GPS_SEG_DEMO_RUN to a finished runs/demo-quick/gps folder)"
            )
        cwd = tmp_path_factory.mktemp("demo")
        subprocess.run([str(exe), "demo", "--quick", "--quiet"], cwd=cwd, check=True)
        run = cwd / "runs" / "demo-quick" / "gps"
    for f in ("summary.json", "merged.safetensors", "config.json", "gps/gps_config.json"):
        assert (run / f).is_file(), f"{run / f}: missing (not a finished demo run)"
    return run
