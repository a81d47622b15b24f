"""Merging a GPS artifact into a base state dict: the merge ``gps-seg merge`` does
(``src/gps/merge.rs``), bit for bit, and the base content hash it checks first
(``content_hash`` in ``src/util/tensors.rs``).

Selected tensors become ``base + delta`` at their flat indices (float32 addition, the indices
unique, as Candle's ``index_add``); fully trainable tensors are replaced by their tuned value;
every other tensor passes through untouched. A base whose names, shapes or content hash differ
from the artifact's is refused, and so is a non-finite result, naming the tensor.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._artifact import Artifact, GpsSegError, _check_finite


def _is_torch(value: Any) -> bool:
    return type(value).__module__.split(".")[0] == "torch"


def _as_float32(name: str, value: Any) -> np.ndarray:
    """``value`` (numpy array or torch tensor) as a C-contiguous float32 numpy array, converted
    as gps-seg's loader converts (f16 / bf16 exactly, f64 and integers rounded to nearest)."""
    if _is_torch(value):
        value = value.detach().to("cpu").float().numpy()
    a = np.asarray(value)
    if a.dtype.kind not in "fiub":
        raise GpsSegError(f"tensor `{name}`: unsupported dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float32)


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in value.shape)


def content_hash(state_dict: Mapping[str, Any]) -> str:
    """The hex SHA-256 gps-seg identifies a base model by: over the tensors in name order
    (Rust's byte-wise ``BTreeMap`` order, which is Python's ``sorted`` on ``str``), each
    tensor's UTF-8 name, a zero byte, every dimension as u64 little-endian, then its values as
    float32 little-endian in row-major order. Values may be numpy arrays or torch tensors."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        a = _as_float32(name, state_dict[name])
        h.update(name.encode("utf-8"))
        h.update(b"\x00")
        for d in a.shape:
            h.update(struct.pack("<Q", d))
        h.update(a.astype("<f4", copy=False).tobytes())
    return h.hexdigest()


def _like(original: Any, merged: np.ndarray) -> Any:
    """``merged`` in the container of ``original``: a torch tensor on its device, else numpy."""
    if _is_torch(original):
        import torch  # type: ignore[import-not-found]  # the values are torch tensors already

        return torch.from_numpy(merged).to(original.device)
    return merged


def apply_delta(state_dict: Mapping[str, Any], artifact: Artifact) -> dict[str, Any]:
    """A NEW state dict: ``state_dict`` with ``artifact``'s tuned values merged in.

    Exactly ``gps-seg merge``: each selected tensor becomes ``base + delta`` at its indices and
    each fully trainable tensor its tuned value, both float32 (returned as torch tensors on the
    original device when the inputs are torch tensors, else numpy arrays); every other entry is
    the input object itself. Keys keep the input's order; ``state_dict`` is not modified.

    Raises :class:`GpsSegError` when the artifact has no delta, a tuned tensor is missing from
    ``state_dict`` or has another shape, the content hash of ``state_dict`` (see
    :func:`content_hash`, over *every* entry) differs from the one the artifact was made for, or
    a merged value is not finite.
    """
    delta = artifact.delta
    if delta is None:
        raise GpsSegError(
            f"{artifact.path}: the artifact has no delta.safetensors "
            "(it was selected but never trained)"
        )

    def foreign(name: str, what: str) -> GpsSegError:
        return GpsSegError(
            f"tensor `{name}`: {what}: "
            f"this delta was made for another base model (`{artifact.base_file}`)"
        )

    for name, expected in sorted(artifact.tensors.items()):
        if name not in state_dict:
            raise foreign(name, "not in the base state dict")
        found = _shape(state_dict[name])
        if found != expected.shape:
            raise foreign(
                name, f"base has shape {list(found)}, the delta expects {list(expected.shape)}"
            )
    digest = content_hash(state_dict)
    if digest != artifact.base_content_hash:
        raise GpsSegError(
            f"base state dict content hash {digest} differs from the one the delta was made for "
            f"({artifact.base_content_hash} of `{artifact.base_file}`): refusing to merge into a "
            "different base"
        )

    out: dict[str, Any] = {}
    for name, value in state_dict.items():
        spec = artifact.tensors.get(name)
        if spec is None:
            out[name] = value
            continue
        if spec.treatment == "selected":
            merged = _as_float32(name, value).reshape(-1).copy()
            idx = artifact.indices[name].astype(np.intp)
            merged[idx] += delta[name]
            merged = merged.reshape(spec.shape)
        else:
            merged = delta[name].copy()
        _check_finite(name, merged)
        out[name] = _like(value, merged)
    return out
