#!/usr/bin/env python3
"""The field's segmentation metrics from an independent implementation, for tests/metrics.rs.

Usage: scripts/check_metrics.py CASES.json CASES.bin OUT.json

Needs PyPI `pysodmetrics` (PySODMetrics, the Python port of PraNet's evaluation toolbox;
verified with pysodmetrics 1.6.2 on numpy 2.3.4 / scipy 1.17.1) and, for HD95, `medpy`
(verified with medpy 0.5.2; only `medpy.metric.binary` is used). `.ci/run` installs both pinned.

CASES.json lists the cases: {"id", "h", "w", "kind": "u8"|"f32", "scale": "as_saved"|"min_max",
"map": byte offset, "gt": byte offset, "set": label}; CASES.bin holds the maps (u8, or f32
little-endian) and the ground truths (u8, nonzero = foreground), row-major h x w.
- kind u8, scale as_saved: pred = map / 255 (float64), scored with normalize=False;
- kind u8, scale min_max: the uint8 map and gt*255 scored with normalize=True (the toolbox's
  im2double + mapminmax, gt > 128);
- kind f32: the f32 values widened to float64, normalize=False.
OUT.json: per case wfm, sm, em_adp, mae, em_curve (ascending thresholds k = 0..255, i.e.
PySODMetrics' curve reversed), dice and iou (PySODMetrics' binary mode, `pred > 0.5`),
has_half (a normalised value equals 0.5 exactly), hd95 (medpy, both masks non-empty, else null);
per set (the cases whose S-measure is finite, in order): PySODMetrics' get_results().
"""
import json
import sys

import numpy as np

try:
    import py_sod_metrics as psm
    from py_sod_metrics.utils import prepare_data
except ImportError:
    sys.stderr.write("check_metrics.py: the `pysodmetrics` package is missing\n")
    sys.exit(2)
try:
    from medpy.metric.binary import hd95 as medpy_hd95
except ImportError:
    medpy_hd95 = None


def num(v):
    """A float for JSON: NaN (PySODMetrics' S-measure with an empty quadrant) as null."""
    v = float(v)
    return v if np.isfinite(v) else None


def main(cases_path, bin_path, out_path):
    with open(cases_path) as f:
        cases = json.load(f)
    blob = open(bin_path, "rb").read()
    out = {"cases": [], "sets": {}, "medpy": medpy_hd95 is not None}
    sets = {}
    for c in cases:
        h, w = c["h"], c["w"]
        n = h * w
        gt = np.frombuffer(blob, np.uint8, n, c["gt"]).reshape(h, w) != 0
        if c["kind"] == "u8":
            m = np.frombuffer(blob, np.uint8, n, c["map"]).reshape(h, w)
            if c["scale"] == "min_max":
                pred_in, gt_in, normalize = m.copy(), gt.astype(np.uint8) * 255, True
            else:
                pred_in, gt_in, normalize = m / 255, gt, False
        else:
            m = np.frombuffer(blob, "<f4", n, c["map"]).reshape(h, w)
            pred_in, gt_in, normalize = m.astype(np.float64), gt, False
        p_norm, _ = prepare_data(pred_in, gt_in) if normalize else (pred_in, gt)
        wfm, sm, em, mae = psm.WeightedFmeasure(), psm.Smeasure(), psm.Emeasure(), psm.MAE()
        fm2 = psm.FmeasureV2(
            metric_handlers={
                "dice": psm.DICEHandler(False, False, with_binary=True, sample_based=True),
                "iou": psm.IOUHandler(False, False, with_binary=True, sample_based=True),
            }
        )
        with np.errstate(all="ignore"):
            for metric in (wfm, sm, em, mae, fm2):
                metric.step(pred_in, gt_in, normalize=normalize)
        r = {
            "id": c["id"],
            "wfm": num(wfm.weighted_fms[-1]),
            "sm": num(sm.sms[-1]),
            "em_adp": num(em.adaptive_ems[-1]),
            "mae": num(mae.maes[-1]),
            "em_curve": [num(v) for v in np.asarray(em.changeable_ems[-1])[::-1]],
            "dice": float(fm2._metric_handlers["dice"].binary_results[-1]),
            "iou": float(fm2._metric_handlers["iou"].binary_results[-1]),
            "has_half": bool(np.any(p_norm == 0.5)),
            "hd95": None,
        }
        binary = p_norm >= 0.5
        if medpy_hd95 is not None and binary.any() and gt.any():
            r["hd95"] = float(medpy_hd95(binary, gt))
        out["cases"].append(r)
        if r["sm"] is not None:
            sets.setdefault(c["set"], []).append((pred_in, gt_in, normalize))
    for name, items in sets.items():
        wfm, sm, em, mae = psm.WeightedFmeasure(), psm.Smeasure(), psm.Emeasure(), psm.MAE()
        for pred_in, gt_in, normalize in items:
            for metric in (wfm, sm, em, mae):
                metric.step(pred_in, gt_in, normalize=normalize)
        curve = em.get_results()["em"]["curve"]
        out["sets"][name] = {
            "images": len(items),
            "wfm": float(wfm.get_results()["wfm"]),
            "sm": float(sm.get_results()["sm"]),
            "em_mean": float(curve.mean()),
            "em_max": float(curve.max()),
            "em_adp": float(em.get_results()["em"]["adp"]),
            "mae": float(mae.get_results()["mae"]),
        }
    with open(out_path, "w") as f:
        json.dump(out, f, allow_nan=False)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.stderr.write(__doc__)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:]))
