"""Reading a GPS artifact folder, as ``gps-seg`` writes it (``src/gps/artifact.rs``).

A folder holding ``gps_config.json`` (format, policy, K, the base model's identity: file name and
content hash, the shape and treatment of every tuned tensor), ``selection.safetensors`` (per
selected tensor its sorted flat indices, ``uint32 [n]``) and, once trained, ``delta.safetensors``
(per selected tensor the delta at its indices, ``float32 [n]``; the whole value of each fully
trainable tensor). Loading validates what ``Artifact::load`` validates; every error names the
file and the tensor or field at fault.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors.numpy import load_file

CONFIG_FILE = "gps_config.json"
SELECTION_FILE = "selection.safetensors"
DELTA_FILE = "delta.safetensors"
FORMAT = "gps-seg-artifact/1"

PathLike = str | os.PathLike[str]


class GpsSegError(ValueError):
    """A file, tensor or field that gps-seg refuses; the message names it."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and role of one tuned tensor of the base model."""

    shape: tuple[int, ...]
    treatment: Literal["selected", "trainable"]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Artifact:
    """A GPS artifact in memory.

    ``indices``: per selected tensor its sorted, unique flat (row-major) indices (``uint32``).
    ``delta``: per selected tensor the tuned delta at those indices (``float32 [n]``), per fully
    trainable tensor its whole tuned value (``float32``, the tensor's shape); ``None`` for a
    selection that was never trained.
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorSpec]
    indices: dict[str, np.ndarray]
    delta: dict[str, np.ndarray] | None

    @property
    def base_content_hash(self) -> str:
        """The content hash of the base checkpoint the artifact was made for."""
        return str(self.config["base"]["content_hash"])

    @property
    def base_file(self) -> str:
        """The base checkpoint's file name (informational)."""
        return str(self.config["base"]["file"])

    @property
    def trainable(self) -> list[str]:
        """Names of the fully trainable tensors."""
        return [n for n, s in self.tensors.items() if s.treatment == "trainable"]


def _float32(path: Path, name: str, a: np.ndarray) -> np.ndarray:
    """A stored tensor as float32 (f16 exactly, f64 rounded to nearest, as gps-seg's loader)."""
    if a.dtype.kind != "f":
        raise GpsSegError(
            f"{path}: tensor `{name}`: expected floating-point values, found {a.dtype}"
        )
    return np.ascontiguousarray(a, dtype=np.float32)


def _check_finite(name: str, a: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        i = int(bad[0])
        raise GpsSegError(f"tensor `{name}` has {a.reshape(-1)[i]} at flat index {i}")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise GpsSegError(f"{path}: cannot read: {e}") from e
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise GpsSegError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise GpsSegError(f"{path}: expected a JSON object")
    return cfg


def _tensor_specs(path: Path, cfg: Mapping[str, Any]) -> dict[str, TensorSpec]:
    def bad(msg: str) -> GpsSegError:
        return GpsSegError(f"{path}: {msg}")

    if cfg.get("format") != FORMAT:
        raise bad(f"unknown format `{cfg.get('format')}` (expected `{FORMAT}`)")
    k = cfg.get("k")
    if not isinstance(k, int) or k < 1:
        raise bad("field `k` must be at least 1")
    base = cfg.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("content_hash"), str):
        raise bad("field `base.content_hash`: missing or not a string")
    raw = cfg.get("tensors")
    if not isinstance(raw, dict):
        raise bad("field `tensors`: missing or not an object")
    specs: dict[str, TensorSpec] = {}
    for name, spec in raw.items():
        shape = spec.get("shape") if isinstance(spec, dict) else None
        treatment = spec.get("treatment") if isinstance(spec, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise bad(f"tensor `{name}`: field `shape` must be a list of sizes")
        if treatment == "frozen":
            raise bad(f"tensor `{name}` is listed as frozen")
        if treatment not in ("selected", "trainable"):
            raise bad(f"tensor `{name}`: unknown treatment `{treatment}`")
        specs[name] = TensorSpec(tuple(shape), treatment)
    return specs


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise GpsSegError(f"{path}: not a readable safetensors file: {e}") from e


def load_artifact(dir: PathLike) -> Artifact:
    """Read and validate the GPS artifact folder ``dir`` (e.g. ``runs/gps-k1/gps``).

    Checks, as ``gps-seg`` does: the format tag, ``k >= 1``, indices ``uint32 [n]``, sorted,
    unique and inside their tensor, no index file for a tensor that is not selected, and a delta
    (when present) holding exactly ``[n]`` per selected and the full shape per trainable tensor,
    all finite. Raises :class:`GpsSegError` naming the file and tensor at fault.
    """
    root = Path(dir)
    cfg_path = root / CONFIG_FILE
    cfg = _read_config(cfg_path)
    specs = _tensor_specs(cfg_path, cfg)

    sel_path = root / SELECTION_FILE
    raw = _load_tensors(sel_path)
    indices: dict[str, np.ndarray] = {}
    for name in sorted(specs):
        spec = specs[name]
        if spec.treatment != "selected":
            continue
        idx = raw.get(name)
        if idx is None:
            raise GpsSegError(f"{sel_path}: no indices for selected tensor `{name}`")
        if idx.dtype != np.uint32 or idx.ndim != 1:
            raise GpsSegError(
                f"{sel_path}: tensor `{name}`: indices must be u32 [n], "
                f"found {idx.dtype} {list(idx.shape)}"
            )
        if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):
            i = int(np.flatnonzero(idx[1:] <= idx[:-1])[0])
            raise GpsSegError(
                f"{sel_path}: tensor `{name}`: selected indices are not sorted and unique "
                f"({idx[i]} then {idx[i + 1]})"
            )
        if idx.size and int(idx[-1]) >= spec.numel:
            raise GpsSegError(
                f"{sel_path}: tensor `{name}`: selected index {int(idx[-1])} is outside the tensor "
                f"({spec.numel} entries, shape {list(spec.shape)})"
            )
        indices[name] = idx
    extra = sorted(set(raw) - set(indices))
    if extra:
        raise GpsSegError(
            f"{sel_path}: tensor `{extra[0]}` is not a selected tensor of {CONFIG_FILE}"
        )

    delta_path = root / DELTA_FILE
    delta: dict[str, np.ndarray] | None = None
    if delta_path.exists():
        stored = _load_tensors(delta_path)
        delta = {}
        for name in sorted(specs):
            spec = specs[name]
            want = (len(indices[name]),) if spec.treatment == "selected" else spec.shape
            t = stored.get(name)
            if t is None:
                raise GpsSegError(
                    f"{delta_path}: tensor `{name}` missing (expected shape {list(want)})"
                )
            if tuple(t.shape) != want:
                raise GpsSegError(
                    f"{delta_path}: tensor `{name}` has shape {list(t.shape)}, "
                    f"expected {list(want)}"
                )
            t = _float32(delta_path, name, t)
            try:
                _check_finite(name, t)
            except GpsSegError as e:
                raise GpsSegError(f"{delta_path}: {e}") from None
            delta[name] = t
        extra = sorted(set(stored) - set(specs))
        if extra:
            raise GpsSegError(
                f"{delta_path}: tensor `{extra[0]}`: "
                "in the delta but neither selected nor trainable"
            )
    return Artifact(path=root, config=cfg, tensors=specs, indices=indices, delta=delta)
