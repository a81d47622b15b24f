"""Reading a training run's ``summary.json`` (written by ``gps-seg train`` / ``demo``;
``RunSummary`` in ``src/train/seg.rs``, ``ClsRunSummary`` in ``src/train/cls.rs``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ._artifact import CONFIG_FILE, GpsSegError

SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class RunSummary:
    """What a run measured, at the epoch chosen on the validation split.

    ``test`` and ``val`` hold the metrics at that epoch — segmentation: ``mdice``, ``miou``,
    ``ref_dice_ignore_bg``, ``ref_iou_ignore_bg``, ``images``; classification: ``top1``.
    ``merged``: the run's merged checkpoint (base architecture, tuned weights) when present;
    ``artifact``: its GPS artifact folder (for :func:`gps_seg.load_artifact`) when present.
    ``raw``: the whole ``summary.json``.
    """

    run: Path
    task: Literal["segmentation", "classification"]
    method: str
    selected_on: str
    best_epoch: int | None
    trainable: int
    total: int
    trainable_pct: float
    test: dict[str, float]
    val: dict[str, float]
    train_images: int
    val_images: int
    test_images: int
    merged: Path | None
    artifact: Path | None
    raw: dict[str, Any]


def read_summary(run: str | os.PathLike[str]) -> RunSummary:
    """Read ``<run>/summary.json`` of a segmentation or classification run.

    Raises :class:`gps_seg.GpsSegError` naming the file and the missing or mistyped field.
    """
    root = Path(run)
    path = root / SUMMARY_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise GpsSegError(f"{path}: cannot read: {e}") from e
    except json.JSONDecodeError as e:
        raise GpsSegError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise GpsSegError(f"{path}: expected a JSON object")

    def field(name: str, kind: type | tuple[type, ...]) -> Any:
        v = raw.get(name)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise GpsSegError(f"{path}: field `{name}`: missing or not {kind}")
        return v

    def metrics(name: str) -> dict[str, float]:
        m = field(name, dict)
        if not all(isinstance(v, (int, float)) for v in m.values()):
            raise GpsSegError(f"{path}: field `{name}`: expected numbers")
        return {k: float(v) for k, v in m.items()}

    best_epoch = raw.get("best_epoch")
    if best_epoch is not None and not isinstance(best_epoch, int):
        raise GpsSegError(f"{path}: field `best_epoch`: not an integer")
    task: Literal["segmentation", "classification"]
    if isinstance(raw.get("best"), dict):
        task = "segmentation"
        test, val = metrics("best"), metrics("val")
    elif "best_acc" in raw:
        task = "classification"
        test = {"top1": float(field("best_acc", (int, float)))}
        val = {"top1": float(field("val_acc", (int, float)))}
    else:
        raise GpsSegError(f"{path}: not a gps-seg run summary (no `best` or `best_acc` field)")
    merged = root / "merged.safetensors"
    artifact = root / "gps"
    return RunSummary(
        run=root,
        task=task,
        method=field("method", str),
        selected_on=field("selected_on", str),
        best_epoch=best_epoch,
        trainable=field("trainable", int),
        total=field("total", int),
        trainable_pct=float(field("trainable_pct", (int, float))),
        test=test,
        val=val,
        train_images=field("train_images", int),
        val_images=field("val_images", int),
        test_images=field("test_images", int),
        merged=merged if merged.is_file() else None,
        artifact=artifact if (artifact / CONFIG_FILE).is_file() else None,
        raw=raw,
    )
