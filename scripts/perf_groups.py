#!/usr/bin/env python3
"""Group a flat `perf report` by what the time is spent on (the per-op tables of docs/PERF.md).

    perf record -F 499 -o perf.data -- target/release/gps-seg bench train --configs tiny:256:4 \
        --iters 10 --device cpu
    perf report -i perf.data --no-children --sort dso,symbol --stdio -g none \
        | python3 scripts/perf_groups.py [--only gps-seg]

Reads the report on stdin and prints one markdown row per group with its share of the samples
(of all samples, or of the samples in the named DSOs with --only). Symbols not matched fall into
"other". Python standard library only.
"""
import argparse
import re
import sys
from collections import OrderedDict

# (group, regex on "dso symbol"); the first match wins.
GROUPS = [
    ("gemm microkernels", r"gemm_f\d+::microkernel"),
    ("gemm packing and dispatch", r"gemm_common|gemm_f\d+::gemm"),
    ("fused attention, outside its gemms (softmax, rel-pos, dq/dk/dv glue)", r"gps_seg::nn::(?:kernels::)?attention"),
    ("fused GELU (forward + backward)", r"gps_seg::nn::(?:kernels::)?fused::gelu"),
    ("fused layer norm", r"gps_seg::nn::(?:kernels::)?fused::.*(?i:layer_?norm)"),
    ("GPS sparse gradients / linear carrier", r"gps_seg::nn::(?:kernels::)?sparse_grad"),
    ("Candle binary element-wise (add/mul/…, incl. backward's gradient sums)", r"binary_map"),
    ("Candle unary / affine / reductions", r"unary_map|Map1|call_mut|::fold|reduce|Reduce|affine"),
    ("Candle strided copies (transpose, contiguous, cat, pad)", r"copy_strided|copy2d|Cat|pad"),
    ("memset (zeros, incl. the gradient store's zeros_like)", r"memset"),
    ("memcpy / memmove", r"memmove|memcpy"),
    ("allocator", r"malloc|_int_free|_int_malloc|cfree|realloc|\bfree\b"),
    ("kernel (page faults, scheduling, wake-ups)", r"\[kernel|\[k\]"),
    ("ONNX Runtime", r"libonnxruntime"),
    ("Python / PyTorch", r"libtorch|python|libgomp|libmkl|libdnnl"),
]

LINE = re.compile(r"^\s*([0-9.]+)%\s+(\S+)\s+(\[[.k]\])\s+(.*?)\s*(-\s+-\s*)?$")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", action="append", default=[],
                    help="count only samples of this DSO (repeatable), e.g. gps-seg")
    a = ap.parse_args()
    totals = OrderedDict((g, 0.0) for g, _ in GROUPS)
    totals["other"] = 0.0
    pats = [(g, re.compile(p)) for g, p in GROUPS]
    all_pct = 0.0
    for line in sys.stdin:
        m = LINE.match(line)
        if not m:
            continue
        pct, dso, kind, sym = float(m.group(1)), m.group(2), m.group(3), m.group(4)
        if a.only and dso not in a.only:
            continue
        all_pct += pct
        key = f"{dso} {kind} {sym}"
        for g, p in pats:
            if p.search(key):
                totals[g] += pct
                break
        else:
            totals["other"] += pct
    if all_pct <= 0:
        sys.exit("no samples parsed: pipe in `perf report --no-children --sort dso,symbol --stdio -g none`")
    print("| where | share |")
    print("|---|---:|")
    for g, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        if v > 0:
            print(f"| {g} | {100 * v / all_pct:.1f}% |")


if __name__ == "__main__":
    main()
